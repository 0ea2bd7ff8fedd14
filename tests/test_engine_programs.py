"""Whole programs against torch autograd: loss and every gradient, eager and compiled.

The programs are a 2-layer MLP with softmax cross-entropy (also as a compiled SGD step) and a
16-step recurrent loop, written with ``mg.scan``, whose accumulators decay at a learned rate.
The default run compiles the recurrent cell with a diagonal recurrent weight. The dense cell
(a matmul inside the loop body) runs eagerly by default and compiled under ``-m slow``, because
its two loop-body graphs took about two more CPU-minutes to compile cold on a 2-core CPU.

Tolerances: the eager engine runs in float64 against torch in float64 with rtol=1e-9,
atol=1e-12. Compiled programs run in float32 and are compared with torch in float64 on the same
inputs, with rtol=1e-5 and atol=1e-5 times the largest magnitude of the expected array (at least
1): matmuls and reductions over n terms carry about sqrt(n) * eps32 * sum|terms| of error. The
100-step SGD trajectory compounds that error through the updates, so it uses rtol=1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modgrad as mg
from modgrad import ops
from modgrad.engine import compile as engine_compile

D, H, C = 7, 16, 5  # MLP input, hidden and class sizes
T, DIN, HR = 16, 3, 12  # recurrent steps, input size, state size


def assert_close_f32(actual, expected, label: str, rtol: float = 1e-5) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, label
    assert actual.dtype == np.float32, label
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5 * scale, err_msg=label)


def assert_close_f64(actual, expected, label: str) -> None:
    actual = np.asarray(actual)
    assert actual.dtype == np.float64, label
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12, err_msg=label)


def torch_grads(loss_fn, params: dict, *args) -> tuple[float, dict]:
    """Loss and gradients from torch autograd in float64."""
    tensors = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in params.items()}
    loss = loss_fn(tensors, *args)
    grads = torch.autograd.grad(loss, list(tensors.values()))
    return loss.item(), {k: g.numpy() for k, g in zip(tensors, grads)}


# --------------------------------------------------------------------------------------------
# 2-layer MLP with softmax cross-entropy


def init_mlp(rng, dtype) -> dict:
    return {
        "w1": (rng.standard_normal((D, H)) / np.sqrt(D)).astype(dtype),
        "b1": (0.1 * rng.standard_normal(H)).astype(dtype),
        "w2": (rng.standard_normal((H, C)) / np.sqrt(H)).astype(dtype),
        "b2": (0.1 * rng.standard_normal(C)).astype(dtype),
    }


def mlp_loss(params, x, labels):
    h = ops.tanh(ops.matmul(x, params["w1"]) + params["b1"])  # (B, H)
    logits = h @ params["w2"] + params["b2"]  # (B, C)
    targets = ops.one_hot(labels, C, dtype=ops.dtype_of(logits))  # (B, C)
    return -ops.mean(ops.sum(ops.log_softmax(logits) * targets, axis=-1))


def torch_mlp_loss(params, x, labels):
    x = torch.tensor(np.asarray(x, np.float64))
    h = torch.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))


def sgd_step(params, x, labels, lr):
    loss, grads = mg.value_and_grad(mlp_loss)(params, x, labels)
    new_params = {k: params[k] - lr * grads[k] for k in params}
    return loss, grads, new_params


def mlp_data(rng, batch: int, dtype):
    return rng.standard_normal((batch, D)).astype(dtype), rng.integers(0, C, batch)


MLP_DIMS = (None, ("B", D), ("B",), None)


@pytest.fixture(scope="module")
def compiled_sgd_step():
    return mg.compile(sgd_step, device="cpu", dims=MLP_DIMS)


@pytest.mark.parametrize("batch", (1, 3, 64))
def test_mlp_eager_matches_torch(batch, rng):
    params = init_mlp(rng, np.float64)
    x, labels = mlp_data(rng, batch, np.float64)
    loss, grads = mg.value_and_grad(mlp_loss)(params, x, labels)
    ref_loss, ref_grads = torch_grads(torch_mlp_loss, params, x, labels)
    assert_close_f64(loss, ref_loss, "loss")
    for name in params:
        assert_close_f64(grads[name], ref_grads[name], f"gradient of {name}")


@pytest.mark.max
@pytest.mark.parametrize("batch", (1, 3, 64))
def test_mlp_compiled_matches_torch(compiled_sgd_step, batch, rng):
    params = init_mlp(rng, np.float32)
    x, labels = mlp_data(rng, batch, np.float32)
    lr = np.float32(0.1)
    loss, grads, new_params = compiled_sgd_step(params, x, labels, lr)
    ref_loss, ref_grads = torch_grads(torch_mlp_loss, params, x, labels)
    assert_close_f32(loss, ref_loss, "loss")
    for name in params:
        assert_close_f32(grads[name], ref_grads[name], f"gradient of {name}")
        expected = params[name].astype(np.float64) - 0.1 * ref_grads[name]
        assert_close_f32(new_params[name], expected, f"updated {name}")


@pytest.mark.max
def test_sgd_weights_are_inputs_not_constants(compiled_sgd_step, rng):
    """100 compiled updates with changing weights and learning rate, and no recompilation."""
    params = init_mlp(rng, np.float32)
    x, labels = mlp_data(rng, 32, np.float32)
    compiled_sgd_step(params, x, labels, np.float32(0.5))  # compiles, or loads from the disk cache
    compiles_after_first_call = engine_compile.STATS["compiles"]

    ref = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in params.items()}
    losses, ref_losses = [], []
    for step in range(100):
        lr = 0.5 if step < 50 else 0.25
        loss, _, params = compiled_sgd_step(params, x, labels, np.float32(lr))
        losses.append(float(loss))

        ref_loss = torch_mlp_loss(ref, x, labels)
        grads = torch.autograd.grad(ref_loss, list(ref.values()))
        with torch.no_grad():
            for p, g in zip(ref.values(), grads):
                p -= lr * g
        ref_losses.append(ref_loss.item())

    assert engine_compile.STATS["compiles"] == compiles_after_first_call
    assert losses[-1] < 0.5 * losses[0], f"training did not reduce the loss: {losses[0]} -> {losses[-1]}"
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for name, p in ref.items():
        assert_close_f32(params[name], p.detach().numpy(), f"{name} after 100 steps", rtol=1e-4)


# --------------------------------------------------------------------------------------------
# 16-step recurrent loop with decaying accumulators


def init_recurrent(rng, dtype, dense: bool = False) -> dict:
    """Parameters of the recurrent cell; ``dense`` picks a (HR, HR) recurrent matrix over a diagonal (HR,)."""
    wh = rng.standard_normal((HR, HR)) / np.sqrt(HR) if dense else rng.uniform(-1.0, 1.0, HR)
    return {
        "wx": (rng.standard_normal((DIN, HR)) / np.sqrt(DIN)).astype(dtype),
        "wh": wh.astype(dtype),
        "b": (0.1 * rng.standard_normal(HR)).astype(dtype),
        "h0": (0.5 * rng.standard_normal(HR)).astype(dtype),
        "decay": rng.uniform(0.0, 3.0, HR).astype(dtype),
        "wout": (rng.standard_normal((HR, C)) / np.sqrt(HR)).astype(dtype),
    }


def recurrent_loss(params, xs, targets, remat: bool = False):
    """Cross-entropy of a readout of decayed state averages at every step, plus a final-state penalty.

    alpha_t = r * alpha_{t-1} + h_t and beta_t = r * beta_{t-1} + 1 with r = exp(-clip(decay, 0, 15)),
    so alpha_t / sqrt(beta_t) weights recent states more, and gradients reach decay through r. The
    input projection and the readout run outside the loop, as batched matmuls over all steps.
    The recurrent weights ``wh`` are a matrix (h @ wh) or a diagonal (h * wh), by their rank.
    ``remat`` picks how the loop's gradient gets the step intermediates (see ``mg.scan``).
    """
    batch = ops.shape_of(xs)[1]
    r = ops.exp(-ops.clip(params["decay"], 0.0, 15.0))  # (HR,)
    h0 = ops.broadcast_to(params["h0"], (batch, HR))
    zeros = ops.zeros((batch, HR), ops.dtype_of(xs))
    inputs = ops.matmul(xs, params["wx"]) + params["b"]  # (T, B, HR)

    def tick(carry, u):
        h, alpha, beta = carry
        recurrent = h @ params["wh"] if len(ops.shape_of(params["wh"])) == 2 else h * params["wh"]
        h = ops.tanh(u + recurrent)  # (B, HR)
        alpha = r * alpha + h
        beta = r * beta + 1.0
        return (h, alpha, beta), alpha * ops.rsqrt(beta)

    (h, _, _), syncs = mg.scan(tick, (h0, zeros, zeros), inputs, remat=remat)  # syncs (T, B, HR)
    logits = syncs @ params["wout"]  # (T, B, C)
    targets = ops.one_hot(targets, C, dtype=ops.dtype_of(xs))
    ce = -ops.mean(ops.sum(ops.log_softmax(logits) * targets, axis=-1))
    return ce + 0.1 * ops.mean(ops.square(h))


def torch_recurrent_loss(params, xs, targets):
    xs = torch.tensor(np.asarray(xs, np.float64))
    batch = xs.shape[1]
    r = torch.exp(-torch.clamp(params["decay"], 0.0, 15.0))
    h = params["h0"].expand(batch, HR)
    alpha = torch.zeros(batch, HR, dtype=torch.float64)
    beta = torch.zeros(batch, HR, dtype=torch.float64)
    ce = []
    for t in range(xs.shape[0]):
        recurrent = h @ params["wh"] if params["wh"].ndim == 2 else h * params["wh"]
        h = torch.tanh(xs[t] @ params["wx"] + params["b"] + recurrent)
        alpha = r * alpha + h
        beta = r * beta + 1.0
        logits = (alpha / torch.sqrt(beta)) @ params["wout"]
        ce.append(torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets[t])))
    return torch.stack(ce).mean() + 0.1 * torch.mean(h * h)


def recurrent_data(rng, steps: int, batch: int, dtype):
    return rng.standard_normal((steps, batch, DIN)).astype(dtype), rng.integers(0, C, (steps, batch))


def recurrent_value_and_grad(params, xs, targets):
    return mg.value_and_grad(recurrent_loss)(params, xs, targets)


RECURRENT_DIMS = (None, ("T", "B", DIN), ("T", "B"))  # steps and batch symbolic


@pytest.fixture(scope="module")
def compiled_recurrent():
    """The diagonal cell, compiled once for every length (the scan body is traced once)."""
    return mg.compile(recurrent_value_and_grad, device="cpu", dims=RECURRENT_DIMS)


@pytest.mark.parametrize("dense", (False, True), ids=("diagonal", "dense"))
@pytest.mark.parametrize("batch", (1, 4))
def test_recurrent_eager_matches_torch(batch, dense, rng):
    params = init_recurrent(rng, np.float64, dense)
    xs, targets = recurrent_data(rng, T, batch, np.float64)
    loss, grads = mg.value_and_grad(recurrent_loss)(params, xs, targets)
    ref_loss, ref_grads = torch_grads(torch_recurrent_loss, params, xs, targets)
    assert_close_f64(loss, ref_loss, "loss")
    for name in params:
        assert_close_f64(grads[name], ref_grads[name], f"gradient of {name}")


def test_recurrent_decay_gradient_is_nonzero(rng):
    params = init_recurrent(rng, np.float64, dense=True)
    xs, targets = recurrent_data(rng, T, 2, np.float64)
    _, grads = mg.value_and_grad(recurrent_loss)(params, xs, targets)
    assert np.all(np.abs(grads["decay"]) > 0)


@pytest.mark.max
@pytest.mark.parametrize("steps, batch", [(T, 1), (T, 4), (5, 3)])
def test_recurrent_compiled_matches_torch(compiled_recurrent, steps, batch, rng):
    params = init_recurrent(rng, np.float32)
    xs, targets = recurrent_data(rng, steps, batch, np.float32)
    loss, grads = compiled_recurrent(params, xs, targets)
    ref_loss, ref_grads = torch_grads(torch_recurrent_loss, params, xs, targets)
    assert_close_f32(loss, ref_loss, "loss")
    for name in params:
        assert_close_f32(grads[name], ref_grads[name], f"gradient of {name}")


@pytest.mark.max
def test_recurrent_new_length_does_not_recompile(compiled_recurrent, rng):
    params = init_recurrent(rng, np.float32)
    compiled_recurrent(params, *recurrent_data(rng, T, 2, np.float32))
    before = engine_compile.STATS["compiles"]
    for steps, batch in [(4, 1), (T, 7), (40, 2)]:
        compiled_recurrent(params, *recurrent_data(rng, steps, batch, np.float32))
    assert engine_compile.STATS["compiles"] == before


@pytest.mark.max
@pytest.mark.slow
@pytest.mark.parametrize("host_glue", [
    pytest.param(None, id="default"),
    pytest.param(False, id="all_graphs"),
])
def test_recurrent_dense_compiled_matches_torch(host_glue, rng):
    """The dense cell; host_glue=False compiles the parts around the loops to MAX graphs as well."""
    fn = mg.compile(recurrent_value_and_grad, device="cpu", dims=RECURRENT_DIMS, host_glue=host_glue)
    params = init_recurrent(rng, np.float32, dense=True)
    for steps, batch in [(T, 1), (5, 3)]:
        xs, targets = recurrent_data(rng, steps, batch, np.float32)
        loss, grads = fn(params, xs, targets)
        ref_loss, ref_grads = torch_grads(torch_recurrent_loss, params, xs, targets)
        assert_close_f32(loss, ref_loss, f"loss, T={steps}")
        for name in params:
            assert_close_f32(grads[name], ref_grads[name], f"gradient of {name}, T={steps}")


# --------------------------------------------------------------------------------------------
# Loop gradients: saved residuals against recomputation


def traced_recurrent_gradient(params, xs, targets, remat: bool) -> list:
    """Trace value_and_grad of the recurrent loss symbolically and return its scan nodes in order."""
    from modgrad.engine.core import Trace, trace_scope

    trace = Trace(name="test")
    with trace_scope(trace):
        traced = {k: trace.placeholder(v.shape, v.dtype) for k, v in params.items()}
        mg.value_and_grad(recurrent_loss)(traced, trace.placeholder(xs.shape, xs.dtype), targets, remat)
    return [n for n in trace.nodes if n.prim.name == "scan"], trace


@pytest.mark.parametrize("remat", (False, True), ids=("saved", "remat"))
@pytest.mark.parametrize("dense", (False, True), ids=("diagonal", "dense"))
def test_recurrent_numpy_program_matches_torch(dense, remat, rng):
    """A traced program on the numpy device takes the loop gradient from saved residuals unless remat."""
    params = init_recurrent(rng, np.float64, dense)
    xs, targets = recurrent_data(rng, T, 3, np.float64)
    program = mg.compile(lambda p, x, y: mg.value_and_grad(recurrent_loss)(p, x, y, remat), device="numpy")
    loss, grads = program(params, xs, targets)
    ref_loss, ref_grads = torch_grads(torch_recurrent_loss, params, xs, targets)
    assert_close_f64(loss, ref_loss, "loss")
    for name in params:
        assert_close_f64(grads[name], ref_grads[name], f"gradient of {name}")


@pytest.mark.parametrize("remat", (False, True), ids=("saved", "remat"))
def test_remat_alone_recomputes_forward(remat, rng):
    params = init_recurrent(rng, np.float32, dense=True)
    xs, targets = recurrent_data(rng, T, 2, np.float32)
    (forward, backward), _ = traced_recurrent_gradient(params, xs, targets, remat)
    backward_prims = {n.prim.name for n in backward.attrs["body"].nodes}
    forward_outputs = len(forward.attrs["body"].outputs)
    if remat:
        assert "tanh" in backward_prims
        assert forward_outputs == 4  # carry (h, alpha, beta) and the sync
    else:
        # tanh's VJP reads the saved output, so the backward step runs no tanh of its own.
        assert "tanh" not in backward_prims
        assert forward.attrs["saved"] and forward_outputs > 4
        assert len(forward.outputs) == forward_outputs + 3  # stacked outputs, then the carry history


def test_loop_gradient_saves_no_views(rng):
    """A transpose or broadcast of a saved value is recomputed by the backward step, not saved too."""
    from modgrad.engine.prims.control import _RECOMPUTED

    params = init_recurrent(rng, np.float32, dense=True)
    xs, targets = recurrent_data(rng, T, 2, np.float32)
    (forward, _), _ = traced_recurrent_gradient(params, xs, targets, remat=False)
    saved = forward.attrs["body"].outputs[4:]
    assert saved
    producers = [v.node.prim.name for v in saved if v.node is not None]
    assert not set(producers) & _RECOMPUTED, producers


def test_constant_residuals_computed_once(rng):
    """wh's transpose (for d h = g @ wh.T) depends on no step, so it is computed before the backward loop."""
    params = init_recurrent(rng, np.float32, dense=True)
    xs, targets = recurrent_data(rng, T, 2, np.float32)
    (forward, backward), trace = traced_recurrent_gradient(params, xs, targets, remat=False)
    consts = backward.inputs[: backward.attrs["n_consts"]]
    hoisted = [c for c in consts if getattr(c, "node", None) is not None and c.node.prim.name == "transpose"]
    assert hoisted and all(c.node in trace.nodes for c in hoisted)


def test_weight_gradient_summed_after_loop(rng):
    """The backward loop carries no running sum for wh: one (HR, T*B) @ (T*B, HR) product follows it."""
    params = init_recurrent(rng, np.float32, dense=True)
    xs, targets = recurrent_data(rng, T, 2, np.float32)
    (_, backward), trace = traced_recurrent_gradient(params, xs, targets, remat=False)
    n_consts, n_carry = backward.attrs["n_consts"], backward.attrs["n_carry"]
    carried = [tuple(v.shape) for v in backward.inputs[n_consts : n_consts + n_carry]]
    assert (HR, HR) not in carried
    after = trace.nodes[trace.nodes.index(backward) + 1 :]
    products = [tuple(n.inputs[0].shape) for n in after if n.prim.name == "matmul"]
    assert (HR, T * 2) in products


def layer_norm_loop_loss(p, xs):
    def step(h, x):
        h = ops.layer_norm(h @ p["w"] + x, p["g1"], p["b1"])
        h = ops.tanh(ops.layer_norm(h, p["g2"], p["b2"]))
        return h, ops.sum(h)

    h, ys = mg.scan(step, ops.zeros((3, 4), np.float64), xs)
    return ops.sum(ops.square(h)) + 0.5 * ops.sum(ys)


def traced_layer_norm_loop(p, xs, device):
    """Return the layer-norm loop's value_and_grad traced for ``device``, and its backward loop's carry shapes."""
    from modgrad.engine.core import Program, Trace, trace_scope
    from modgrad.engine.pytree import tree_flatten

    trace = Trace(name="test", device=device)
    with trace_scope(trace):
        traced = {k: trace.placeholder(v.shape, v.dtype) for k, v in p.items()}
        out = mg.value_and_grad(layer_norm_loop_loss)(traced, trace.placeholder(xs.shape, xs.dtype))
    backward = [n for n in trace.nodes if n.prim.name == "scan"][-1]
    n_consts, n_carry = backward.attrs["n_consts"], backward.attrs["n_carry"]
    carried = [tuple(v.shape) for v in backward.inputs[n_consts : n_consts + n_carry]]
    return Program(trace.inputs, trace.nodes, tree_flatten(out)[0]), carried


def layer_norm_loop_params(rng):
    p = {"w": rng.standard_normal((4, 4)) / 2, "g1": 1 + rng.standard_normal(4) / 4, "b1": rng.standard_normal(4) / 4,
         "g2": 1 + rng.standard_normal(4) / 4, "b2": rng.standard_normal(4) / 4}
    return p, rng.standard_normal((6, 3, 4))


def test_small_sums_packed_when_compiled(rng):
    """The layer norms' scales and shifts (four sums of 4 values) travel as one carry of 16."""
    from modgrad.engine.interpret import run_program
    from modgrad.engine.pytree import tree_flatten

    p, xs = layer_norm_loop_params(rng)
    program, carried = traced_layer_norm_loop(p, xs, "cpu")
    assert carried.count((16,)) == 1, carried
    assert (4,) not in carried, carried

    loss, grads = mg.value_and_grad(layer_norm_loop_loss)(p, xs)
    got = run_program(program, [*p.values(), xs])  # the placeholders' order
    np.testing.assert_allclose(got[0], loss, rtol=1e-12)
    for name, value, want in zip(sorted(grads), got[1:], tree_flatten(grads)[0]):
        np.testing.assert_allclose(value, want, rtol=1e-10, atol=1e-12, err_msg=name)


def test_small_sums_unpacked_for_numpy(rng):
    """For the numpy evaluator each sum keeps its own carry."""
    p, xs = layer_norm_loop_params(rng)
    _, carried = traced_layer_norm_loop(p, xs, "numpy")
    assert carried.count((4,)) == 4, carried
    assert (16,) not in carried, carried


def test_small_sums_packed_up_to_limit(rng, monkeypatch):
    """Past PACK_MAX_SUMS sums, the rest keep a carry each, and the gradients stay exact."""
    from modgrad.engine.interpret import run_program
    from modgrad.engine.prims import deferred
    from modgrad.engine.pytree import tree_flatten

    monkeypatch.setattr(deferred, "PACK_MAX_SUMS", 3)
    p, xs = layer_norm_loop_params(rng)
    program, carried = traced_layer_norm_loop(p, xs, "cpu")
    assert carried.count((12,)) == 1, carried
    assert carried.count((4,)) == 1, carried

    loss, grads = mg.value_and_grad(layer_norm_loop_loss)(p, xs)
    got = run_program(program, [*p.values(), xs])
    np.testing.assert_allclose(got[0], loss, rtol=1e-12)
    for name, value, want in zip(sorted(grads), got[1:], tree_flatten(grads)[0]):
        np.testing.assert_allclose(value, want, rtol=1e-10, atol=1e-12, err_msg=name)


def test_nested_loop_gradient_matches_eager(rng):
    """A scan inside a scan body: the inner loop's residuals become residuals of the outer loop."""

    def loss(w, xs):
        def outer(h, x):
            def inner(g, k):
                return ops.tanh(g @ w + x * k), ops.sum(g)

            g, sums = mg.scan(inner, h, np.array([0.5, 1.0, 1.5]))
            return g, ops.sum(sums)

        h, ys = mg.scan(outer, ops.zeros((2, 4), np.float64), xs)
        return ops.sum(ops.square(h)) + ops.sum(ys)

    w = rng.standard_normal((4, 4)) / 2.0
    xs = rng.standard_normal((5, 2, 4))
    eager = mg.value_and_grad(loss, argnums=(0, 1))(w, xs)
    traced = mg.compile(mg.value_and_grad(loss, argnums=(0, 1)), device="numpy")(w, xs)
    np.testing.assert_allclose(traced[0], eager[0], rtol=1e-12)
    for got, want in zip(traced[1], eager[1]):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_numpy_scan_skips_unread_outputs(rng):
    """A scan in a generated numpy program receives the outputs that nothing reads and skips stacking them."""
    from modgrad.engine.core import Program, Trace, trace_scope
    from modgrad.engine.interpret import program_runner, run_program

    w = rng.standard_normal((3, 3)) / 2.0
    h0 = rng.standard_normal((2, 3))
    trace = Trace(name="test")
    with trace_scope(trace):
        h = trace.placeholder(h0.shape, h0.dtype)
        final, ys = mg.scan(lambda c, _: (ops.tanh(c @ w), ops.sum(c)), h, length=4)
    (scan_node,) = [n for n in trace.nodes if n.prim.name == "scan"]
    program = Program(trace.inputs, trace.nodes, [final])
    unread = scan_node.prim.impl(h0, *scan_node.inputs[1:], **scan_node.attrs, unread=frozenset({1, 2}))
    assert unread[1] is None
    assert unread[2] is None

    expected = h0
    for _ in range(4):
        expected = np.tanh(expected @ w)
    (got,) = run_program(program, [h0])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(unread[0], expected, rtol=1e-12)
    assert program_runner(program) is program_runner(program)  # generated once per program
