"""Compiled programs (MAX on the CPU) against the numpy reference, and the compile front door.

Two programs apply the primitives and return their outputs together with the gradient of
sum_k sum(sin(out_k)) with respect to every input:

- COMPACT (default run) chains the primitives into 16 outputs of 6 inputs, so that its cold
  compile took about 100 s on a shared 2-core x86-64 CPU. It leaves matmul to the MLP and
  recurrent programs of test_engine_programs.py;
- ISOLATED (``-m slow``, about 5.5 CPU-minutes to compile cold) gives every op, the composites
  and the batched matmul their own input and output, so a failure names the op and each gradient
  checks one VJP.

The batch axis "N" is symbolic, so each compiled program runs every size in SIZES, and
``STATS["compiles"]`` shows that no size recompiles. The reference is the same function run
eagerly in float64 on the same float32 inputs (the eager engine is checked against torch in
test_engine_ops.py). Tolerances for the float32 programs: rtol=1e-5 and atol=1e-5 times the
largest magnitude of the expected array (at least 1), because reductions and matmuls over n
terms carry about sqrt(n) * eps32 * sum|terms| of rounding error. Where the program itself is
ill-conditioned in float32, atol grows to 4 times the largest error of the same program run
eagerly by numpy in float32. Bool and integer outputs must match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import modgrad as mg
from modgrad import ops
from modgrad.engine import compile as engine_compile
from modgrad.engine.core import ShapeError, bind
from modgrad.engine.prims import elementwise as ew

SIZES = (1, 3, 59, 96, 98, 224)
F = 8  # static feature width
V = 5  # rows of the embedding table
RTOL = 1e-5
ATOL = 1e-5


def other_float(dtype) -> type:
    return np.float32 if np.dtype(dtype) == np.float64 else np.float64


def make_array(rng: np.random.Generator, shape: tuple, kind: str) -> np.ndarray:
    if kind == "positive":
        value = rng.uniform(0.5, 2.0, shape)
    elif kind == "nonzero":
        value = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    elif kind == "rounded":
        value = np.round(2.0 * rng.standard_normal(shape))  # small integers: comparisons see ties
    elif kind == "wide":
        value = 5.0 * rng.standard_normal(shape)
    else:
        value = rng.standard_normal(shape)
    return value.astype(np.float32)


@dataclass(frozen=True)
class OpProgram:
    """A function of named inputs (axis "N" symbolic) and int ids, compiled with its gradients."""

    name: str
    specs: dict[str, tuple]  # input name -> (shape with "N" for the batch axis, kind of values)
    outputs: Callable[[dict, object], dict]  # (inputs, ids) -> named outputs

    def make_inputs(self, rng: np.random.Generator, n: int) -> tuple[dict, np.ndarray]:
        params = {}
        for name, (shape, kind) in self.specs.items():
            params[name] = make_array(rng, tuple(n if d == "N" else d for d in shape), kind)
        return params, rng.integers(0, V, n)

    def dims(self) -> tuple:
        return ({name: shape for name, (shape, _) in self.specs.items()}, ("N",))

    def value_and_grad(self, params: dict, ids):
        """Return (outputs, loss, grads) with loss = sum of sum(sin(out)) over outputs of the input dtype."""
        dtype = ops.dtype_of(next(iter(params.values())))

        def loss_fn(p):
            outs = self.outputs(p, ids)
            total = None
            for name in sorted(outs):
                if ops.dtype_of(outs[name]) == dtype:  # leaves out bool, int and one_hot's float32
                    term = ops.sum(ops.sin(outs[name]))
                    total = term if total is None else ops.add(total, term)
            return total, outs

        (loss, outs), grads = mg.value_and_grad(loss_fn, has_aux=True)(params)
        return outs, loss, grads

    def float64_reference(self, params: dict, ids: np.ndarray):
        return self.value_and_grad({k: v.astype(np.float64) for k, v in params.items()}, ids)

    def output_names(self) -> list[str]:
        params, ids = self.make_inputs(np.random.default_rng(0), 2)
        return sorted(self.float64_reference(params, ids)[0])


# --------------------------------------------------------------------------------------------
# COMPACT: every lowered primitive, chained into few outputs


def compact_outputs(p: dict, ids) -> dict:
    x, pos, col, w = p["x"], p["pos"], p["col"], p["w"]  # (N, F), (N, F) in [0.5, 2], (N, 1), (F,)
    n = ops.shape_of(x)[0]  # "N" while tracing for compile, an int when eager
    dtype = ops.dtype_of(x)

    unary = (
        ops.exp(ops.neg(x)) + ops.log(pos) * ops.sqrt(pos) - ops.rsqrt(pos) + ops.abs(x)
        + ops.tanh(x) * ops.sigmoid(x) + ops.sin(x) / (ops.cos(x) + 2.0) + bind(ew.floor_p, x)
    )  # (N, F)
    binary = ops.pow(pos, w) + ops.maximum(x, w) - ops.minimum(x, col)  # (N, F)
    chosen = ops.where(ops.greater(x, col), unary, binary)  # (N, F)
    cast = ops.cast(ops.mul(ops.cast(chosen, other_float(dtype)), 0.5), dtype)  # (N, F)
    rows = ops.transpose(ops.reshape(cast * p["scale"], (n, 2, 4)), (0, 2, 1))  # (N, 4, 2)
    joined = ops.concat([ops.reshape(rows, (n, 8)), ops.slice_axis(x, 1, 2, 5)], axis=1)  # (N, 11)
    picked = ops.gather(joined, np.array([0, 0, 10, 7]), axis=1)  # (N, 4), a repeated index
    embedded = ops.gather(p["table"], ids, axis=0) * ops.broadcast_to(w, (n, F))  # (N, F), traced ids

    # Doubling is exact in both float types, so the floors and their ties agree bit for bit.
    a, b = bind(ew.floor_p, x * 2.0), bind(ew.floor_p, col * 2.0)  # (N, F), (N, 1)
    ties = bind(ew.logical_and_p, ops.greater_equal(a, b), bind(ew.less_equal_p, a, b))
    differ = bind(ew.logical_not_p, bind(ew.not_equal_p, a, b))
    return {
        "unary": unary,
        "binary": binary,
        "chosen": chosen,
        "cast": cast,
        "rows": rows,
        "joined": joined,
        "picked": picked,
        "embedded": embedded,
        "over_batch": ops.softmax(picked, axis=0),  # normalises over the symbolic axis
        "ties": bind(ew.logical_or_p, ties, ops.equal(a, b)),
        "not_differ": differ,
        "sum0": ops.sum(embedded, axis=0),
        "max1": ops.max(chosen, axis=1, keepdims=True),
        "argmax": ops.argmax(joined, axis=1),
        "mean0": ops.mean(picked, axis=0),
        "one_hot": ops.one_hot(ids, V),
    }


COMPACT = OpProgram(
    "compact_ops",
    {
        "x": (("N", F), "normal"),
        "pos": (("N", F), "positive"),
        "col": (("N", 1), "normal"),
        "w": ((F,), "normal"),
        "scale": ((F,), "normal"),
        "table": ((V, F), "normal"),
    },
    compact_outputs,
)


# --------------------------------------------------------------------------------------------
# ISOLATED: one input and one output per op


def isolated_specs() -> dict[str, tuple]:
    batch = ("N", F)
    specs = {name: (batch, "normal") for name in (
        "neg", "exp", "tanh", "sigmoid", "sin", "cos", "floor", "add", "sub", "mul", "maximum", "minimum",
        "where", "where_y", "where_c", "cast", "sum0", "sum1", "max0", "max1", "argmax", "mean0", "var0",
        "matmul", "matmul_t", "reshape", "concat", "slice", "getitem", "getitem_rev", "gather", "softmax",
        "softmax0", "log_softmax", "logsumexp", "layer_norm", "rms_norm", "glu", "clip", "silu", "relu",
    )}
    specs.update({
        "log": (batch, "positive"), "sqrt": (batch, "positive"), "rsqrt": (batch, "positive"),
        "abs": (batch, "nonzero"), "sign": (batch, "nonzero"), "div": (batch, "normal"),
        "div_y": (batch, "nonzero"), "pow": (batch, "positive"), "cast_int": (batch, "wide"),
        "cmp_x": (batch, "rounded"), "cmp_y": (batch, "rounded"),
        "add_y": ((F,), "normal"), "sub_y": (("N", 1), "normal"), "mul_y": ((1, F), "normal"),
        "pow_y": ((F,), "normal"), "maximum_y": ((F,), "normal"), "minimum_y": (("N", 1), "normal"),
        "matmul_w": ((F, 6), "normal"), "matmul_t_y": (("N", 6), "normal"), "bmm_w": ((4, 3), "normal"),
        "broadcast": ((F,), "normal"), "concat_y": (("N", 3), "normal"), "table": ((V, F), "normal"),
        "ln_gamma": ((F,), "normal"), "ln_beta": ((F,), "normal"), "rms_weight": ((F,), "normal"),
    })
    return specs


def isolated_outputs(p: dict, ids) -> dict:
    n = ops.shape_of(p["neg"])[0]
    x, y = p["cmp_x"], p["cmp_y"]
    positive_x, positive_y = ops.greater(x, 0.0), ops.greater(y, 0.0)
    return {
        # unary maps
        "neg": ops.neg(p["neg"]),
        "exp": ops.exp(p["exp"]),
        "log": ops.log(p["log"]),
        "tanh": ops.tanh(p["tanh"]),
        "sigmoid": ops.sigmoid(p["sigmoid"]),
        "sqrt": ops.sqrt(p["sqrt"]),
        "rsqrt": ops.rsqrt(p["rsqrt"]),
        "abs": ops.abs(p["abs"]),
        "sign": bind(ew.sign_p, p["sign"]),
        "sin": ops.sin(p["sin"]),
        "cos": ops.cos(p["cos"]),
        "floor": bind(ew.floor_p, p["floor"]),
        # broadcasting arithmetic
        "add": ops.add(p["add"], p["add_y"]),
        "sub": ops.sub(p["sub"], p["sub_y"]),
        "mul": ops.mul(p["mul"], p["mul_y"]),
        "div": ops.div(p["div"], p["div_y"]),
        "pow": ops.pow(p["pow"], p["pow_y"]),
        "maximum": ops.maximum(p["maximum"], p["maximum_y"]),
        "minimum": ops.minimum(p["minimum"], p["minimum_y"]),
        # comparisons, logic, where, cast
        "greater": ops.greater(x, y),
        "greater_equal": ops.greater_equal(x, y),
        "less_equal": bind(ew.less_equal_p, x, y),
        "equal": ops.equal(x, y),
        "not_equal": bind(ew.not_equal_p, x, y),
        "logical_and": bind(ew.logical_and_p, positive_x, positive_y),
        "logical_or": bind(ew.logical_or_p, positive_x, positive_y),
        "logical_not": bind(ew.logical_not_p, positive_x),
        "where": ops.where(ops.greater(p["where_c"], 0.0), p["where"], p["where_y"]),
        "cast": ops.cast(ops.mul(ops.cast(p["cast"], other_float(ops.dtype_of(x))), 3.0), ops.dtype_of(x)),
        "cast_int": ops.cast(p["cast_int"], np.int64),
        # reductions (axis 0 is the symbolic one)
        "sum0": ops.sum(p["sum0"], axis=0),
        "sum1": ops.sum(p["sum1"], axis=1, keepdims=True),
        "max0": ops.max(p["max0"], axis=0),
        "max1": ops.max(p["max1"], axis=1),
        "argmax": ops.argmax(p["argmax"], axis=1),
        "mean0": ops.mean(p["mean0"], axis=0),
        "var0": ops.var(p["var0"], axis=0),
        # matrix products: plain, contracting over the symbolic axis, batched over it
        "matmul": ops.matmul(p["matmul"], p["matmul_w"]),
        "matmul_t": ops.matmul(ops.transpose(p["matmul_t"]), p["matmul_t_y"]),
        "bmm": ops.matmul(ops.reshape(p["matmul"], (n, 2, 4)), p["bmm_w"]),
        # shapes
        "reshape": ops.transpose(ops.reshape(p["reshape"], (n, 2, 4)), (0, 2, 1)),
        "broadcast": ops.broadcast_to(p["broadcast"], (n, F)),
        "concat": ops.concat([p["concat"], p["concat_y"]], axis=1),
        "slice": ops.slice_axis(p["slice"], 1, 2, 7),
        "getitem": ops.getitem(p["getitem"], (slice(None), slice(None, None, 3))),
        "getitem_rev": ops.getitem(p["getitem_rev"], (slice(None), slice(None, None, -2))),
        "gather": ops.gather(p["gather"], np.array([0, 0, 3, 7, 3]), axis=1),
        "embed": ops.gather(p["table"], ids, axis=0),
        "one_hot": ops.one_hot(ids, V),
        # composites
        "softmax": ops.softmax(p["softmax"]),
        "softmax0": ops.softmax(p["softmax0"], axis=0),
        "log_softmax": ops.log_softmax(p["log_softmax"]),
        "logsumexp": ops.logsumexp(p["logsumexp"]),
        "layer_norm": ops.layer_norm(p["layer_norm"], p["ln_gamma"], p["ln_beta"]),
        "rms_norm": ops.rms_norm(p["rms_norm"], p["rms_weight"]),
        "glu": ops.glu(p["glu"]),
        "clip": ops.clip(p["clip"], -0.5, 0.5),
        "silu": ops.silu(p["silu"]),
        "relu": ops.relu(p["relu"]),
    }


ISOLATED = OpProgram("isolated_ops", isolated_specs(), isolated_outputs)

PROGRAMS = {"compact": COMPACT, "isolated": ISOLATED}
OUTPUT_CASES = [
    pytest.param(program, name, marks=[pytest.mark.max] + ([pytest.mark.slow] if program == "isolated" else []),
                 id=f"{program}-{name}")
    for program in PROGRAMS for name in PROGRAMS[program].output_names()
]
GRAD_CASES = [
    pytest.param(program, name, marks=[pytest.mark.max] + ([pytest.mark.slow] if program == "isolated" else []),
                 id=f"{program}-{name}")
    for program in PROGRAMS for name in sorted(PROGRAMS[program].specs)
]
PROGRAM_CASES = [
    pytest.param("compact", marks=pytest.mark.max),
    pytest.param("isolated", marks=[pytest.mark.max, pytest.mark.slow]),
]


def assert_close(actual, expected, eager32, label: str) -> None:
    """Compare a compiled result with the float64 reference; ``eager32`` is numpy's float32 result."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, label
    if not np.issubdtype(expected.dtype, np.floating):
        assert actual.dtype == expected.dtype, label
        np.testing.assert_array_equal(actual, expected, err_msg=label)
        return
    assert actual.dtype == np.float32, label
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    eager_error = float(np.max(np.abs(np.asarray(eager32, np.float64) - expected), initial=0.0))
    atol = max(ATOL * scale, 4.0 * eager_error)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=label)


# --------------------------------------------------------------------------------------------
# One compile per program, every size


@pytest.fixture(scope="module")
def compiled_results():
    """Program name -> (size -> (compiled, float64 reference, eager float32), compile count per size).

    Each program compiles on first request only, so a run that selects no slow test never
    compiles ISOLATED.
    """
    cache = {}

    def get(program_name: str):
        if program_name not in cache:
            program = PROGRAMS[program_name]
            fn = mg.compile(program.value_and_grad, device="cpu", dims=program.dims(), name=program.name)
            rng = np.random.default_rng(123)
            results, compiles = {}, []
            for n in SIZES:
                params, ids = program.make_inputs(rng, n)
                results[n] = (fn(params, ids), program.float64_reference(params, ids),
                              program.value_and_grad(params, ids))
                compiles.append(engine_compile.STATS["compiles"])
            cache[program_name] = (results, compiles)
        return cache[program_name]

    return get


@pytest.mark.parametrize("program", PROGRAM_CASES)
def test_one_compile_serves_every_size(compiled_results, program):
    _, compiles = compiled_results(program)
    assert compiles == [compiles[0]] * len(SIZES), f"compile count after each size: {compiles}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("program, name", OUTPUT_CASES)
def test_compiled_forward(compiled_results, program, name, n):
    (outs, _, _), (ref_outs, _, _), (eager_outs, _, _) = compiled_results(program)[0][n]
    assert_close(outs[name], ref_outs[name], eager_outs[name], f"{name} at N={n}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("program, name", GRAD_CASES)
def test_compiled_vjp(compiled_results, program, name, n):
    (_, _, grads), (_, _, ref_grads), (_, _, eager_grads) = compiled_results(program)[0][n]
    assert_close(grads[name], ref_grads[name], eager_grads[name], f"gradient of {name} at N={n}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("program", PROGRAM_CASES)
def test_compiled_loss(compiled_results, program, n):
    (_, loss, _), (_, ref_loss, _), (_, eager_loss, _) = compiled_results(program)[0][n]
    assert np.shape(loss) == ()
    assert_close(loss, ref_loss, eager_loss, f"loss at N={n}")


# --------------------------------------------------------------------------------------------
# The numpy device runs the same recorded program without MAX


@pytest.mark.parametrize("n", (1, 59))
@pytest.mark.parametrize("program", PROGRAMS)
def test_numpy_device_matches_eager(program, n):
    program = PROGRAMS[program]
    fn = mg.compile(program.value_and_grad, device="numpy", dims=program.dims())
    params, ids = program.make_inputs(np.random.default_rng(n), n)
    outs, loss, grads = fn(params, ids)
    ref_outs, ref_loss, ref_grads = program.value_and_grad(params, ids)
    for name in ref_outs:
        np.testing.assert_array_equal(outs[name], ref_outs[name], err_msg=name)
    for name in ref_grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors at the front door


def mismatched_add(x, y):
    return ops.add(x, y)  # the line a shape error must point at


def test_shape_error_names_op_shapes_and_line():
    x = np.ones((4, 3), np.float32)
    y = np.ones((4, 5), np.float32)
    fn = mg.compile(mismatched_add, device="cpu", dims=(("N", 3), ("N", 5)))
    with pytest.raises(ShapeError) as info:
        fn(x, y)
    message = str(info.value)
    assert "add" in message
    assert "(N, 3)" in message
    assert "(N, 5)" in message
    assert "test_engine_compile.py" in message
    assert "return ops.add(x, y)  # the line a shape error must point at" in message


def test_eager_shape_error_names_line():
    def loss(x):
        return ops.sum(ops.matmul(x, np.ones((4, 2))))  # contraction 3 vs 4

    with pytest.raises(ShapeError) as info:
        mg.value_and_grad(loss)(np.ones((2, 3)))
    message = str(info.value)
    assert "matmul" in message
    assert "(2, 3)" in message
    assert "(4, 2)" in message
    assert "test_engine_compile.py" in message
    assert "contraction 3 vs 4" in message


def test_unknown_device_lists_available():
    with pytest.raises(ValueError) as info:
        mg.compile(lambda x: x, device="tpu")
    message = str(info.value)
    assert "tpu" in message
    for device in mg.devices():
        assert device in message


def test_host_glue_default_rule():
    limit = engine_compile.GLUE_COMPILE_ELEMENTS
    assert engine_compile.default_host_glue("cpu", True, limit - 1)
    assert not engine_compile.default_host_glue("cpu", True, limit)
    assert not engine_compile.default_host_glue("cpu", False, 10)
    assert not engine_compile.default_host_glue("gpu", True, 10)


def test_gpu_without_accelerator_is_rejected():
    if "gpu" in mg.devices():
        pytest.skip("this machine has a MAX accelerator")
    with pytest.raises(ValueError, match="gpu.*no accelerator.*cpu"):
        mg.compile(lambda x: x, device="gpu")


@pytest.mark.max
def test_symbolic_size_from_unused_argument():
    """A graph may read a symbolic size from an argument that none of its ops consume."""
    fn = mg.compile(lambda w, x: ops.broadcast_to(w, (ops.shape_of(x)[0], 3)), device="cpu", dims=(None, ("B", 2)))
    w = np.arange(3, dtype=np.float32)
    out = fn(w, np.ones((4, 2), np.float32))
    np.testing.assert_array_equal(out, np.broadcast_to(w, (4, 3)))


@pytest.mark.max
def test_scalar_times_constant_stays_0d():
    fn = mg.compile(lambda x: (ops.mul(ops.sum(x), 0.5), ops.add(ops.sum(x), 1.0)), device="cpu")
    scaled, shifted = fn(np.ones(3, np.float32))
    assert np.shape(scaled) == ()
    assert np.shape(shifted) == ()
    assert float(scaled) == 1.5
    assert float(shifted) == 4.0


@pytest.mark.max
def test_innermost_reduction_of_broadcast():
    """Reductions over the innermost axis of a value broadcast along an outer axis."""

    def fn(x, row):
        wide = ops.broadcast_to(x, (ops.shape_of(x)[0], 5, 5))  # (B, 5, 5) from (B, 1, 5)
        rows = ops.broadcast_to(row, (4, 5))  # (4, 5) from (1, 5)
        return (ops.sum(wide, -1), ops.max(wide * 2.0, -1), ops.argmax(wide, -1),
                ops.sum(rows, 1), ops.sum(wide - ops.max(wide, -1, keepdims=True), -1))

    compiled = mg.compile(fn, device="cpu", dims=(("B", 1, 5), None))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 5)).astype(np.float32)
    row = rng.standard_normal((1, 5)).astype(np.float32)
    for got, want in zip(compiled(x, row), fn(x, row)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
