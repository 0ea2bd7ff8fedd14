"""The fused ops ``ops.nlm_glu``, ``ops.sync_update``, ``ops.matvec`` and ``ops.trace_push`` against
torch, their compositions, and compiled; and the compiled layer norm and its gradient, with and without SiLU, kernels on and off.

The NLM checks cover D in {1, 9, 32, 512}, M in {2, 4, 8, 25}, B in {1, 3} and H in
{1, 3, 32}, so the matmuls meet single and odd sizes. The sync checks cover B in {1, 3}, the
same D and S in {1, 7, 32}, with repeated pairs and self-pairs. Tolerances: float64 results
match torch to 1e-9 (rtol and atol), float32 results to 1e-5. The hand-derived backward of
each op matches the autodiff VJP of its composition to 1e-9 in float64.

The compiled check runs one program, two NLM stages as in a deep CTM, a sync update of their
output and every gradient, with the Mojo kernels on and then with MAX built-in ops. B, D, M
and S are symbolic, so each setting compiles once for every shape. Both results must match
numpy in float64 run on the same float32 inputs to rtol 1e-5 and atol 1e-5 times the largest
magnitude of the expected array (at least 1), the float32 rounding of sums over up to 64 terms.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import modgrad as mg
from modgrad import ops
from modgrad.engine.core import ShapeError

torch = pytest.importorskip("torch")

NEURONS = (1, 9, 32, 512)
MEMORIES = (2, 4, 8, 25)
BATCHES = (1, 3)
HIDDENS = (1, 3, 32)
CASES = list(itertools.product(NEURONS, MEMORIES, BATCHES, HIDDENS))
TOLERANCE = {np.float64: 1e-9, np.float32: 1e-5}


def nlm_inputs(rng, neurons, memory, batch, hidden, dtype):
    trace = rng.standard_normal((neurons, batch, memory))
    w = rng.standard_normal((neurons, memory, 2 * hidden)) / np.sqrt(memory)
    b = rng.standard_normal((neurons, 2 * hidden))
    grad = rng.standard_normal((neurons, batch, hidden))
    return [x.astype(dtype) for x in (trace, w, b, grad)]


def torch_nlm_glu(trace, w, b):
    return torch.nn.functional.glu(torch.bmm(trace, w) + b[:, None, :], dim=-1)


def composed_nlm_glu(trace, w, b):
    return ops.glu(ops.matmul(trace, w) + ops.expand_dims(b, 1))


def grads_of(fn, trace, w, b, grad):
    loss = mg.value_and_grad(lambda t, w, b: ops.sum(fn(t, w, b) * grad), argnums=(0, 1, 2))
    return loss(trace, w, b)[1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("neurons,memory,batch,hidden", CASES)
def test_nlm_glu_matches_torch(rng, dtype, neurons, memory, batch, hidden):
    trace, w, b, grad = nlm_inputs(rng, neurons, memory, batch, hidden, dtype)
    tol = TOLERANCE[dtype]

    out = ops.nlm_glu(trace, w, b)
    assert out.dtype == dtype
    tensors = [torch.tensor(x, requires_grad=True) for x in (trace, w, b)]
    expected = torch_nlm_glu(*tensors)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=tol, atol=tol)

    expected.backward(torch.tensor(grad))
    for name, got, t in zip(("d_trace", "d_w", "d_b"), grads_of(ops.nlm_glu, trace, w, b, grad), tensors):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("neurons,memory,batch,hidden", [(1, 2, 1, 1), (9, 4, 3, 3), (32, 25, 3, 32)])
def test_nlm_glu_backward_matches_composition(rng, neurons, memory, batch, hidden):
    trace, w, b, grad = nlm_inputs(rng, neurons, memory, batch, hidden, np.float64)
    np.testing.assert_allclose(ops.nlm_glu(trace, w, b), composed_nlm_glu(trace, w, b), rtol=1e-9, atol=1e-9)
    fused = grads_of(ops.nlm_glu, trace, w, b, grad)
    composed = grads_of(composed_nlm_glu, trace, w, b, grad)
    for name, got, expected in zip(("d_trace", "d_w", "d_b"), fused, composed):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9, err_msg=name)


def test_nlm_glu_rejects_bad_shapes(rng):
    trace, w, b, _ = nlm_inputs(rng, 4, 3, 2, 2, np.float32)
    with pytest.raises(ShapeError, match="even static number"):
        ops.nlm_glu(trace, w[..., :3], b[..., :3])
    with pytest.raises(ShapeError, match="neuron counts differ"):
        ops.nlm_glu(trace[:3], w, b)
    with pytest.raises(ShapeError, match="trace window"):
        ops.nlm_glu(trace[..., :2], w, b)
    with pytest.raises(ShapeError, match="one floating dtype"):
        ops.nlm_glu(trace, w.astype(np.float64), b)


def test_kernel_flag_resolution(monkeypatch):
    fused = pytest.importorskip("modgrad.graphs.fused")
    defaults = frozenset(name for name, on in fused.KERNEL_DEFAULTS.items() if on)
    everything = frozenset(fused.KERNEL_DEFAULTS)

    monkeypatch.delenv("MODGRAD_KERNELS", raising=False)
    assert fused.kernel_ops(None) == defaults
    assert fused.kernel_ops(True) == everything
    assert fused.kernel_ops(False) == frozenset()

    monkeypatch.setenv("MODGRAD_KERNELS", "0")
    assert fused.kernel_ops(None) == frozenset()
    assert fused.kernel_ops(True) == everything  # an explicit flag wins over the environment
    monkeypatch.setenv("MODGRAD_KERNELS", "1")
    assert fused.kernel_ops(None) == everything
    monkeypatch.setenv("MODGRAD_KERNELS", "yes")
    with pytest.raises(ValueError, match="MODGRAD_KERNELS must be 0 or 1"):
        fused.kernel_ops(None)
    with pytest.raises(TypeError, match="kernels must be"):
        mg.compile(lambda x: x, kernels="on")


# --------------------------------------------------------------------------------------------
# Sync update

SYNC_CASES = list(itertools.product((1, 3), NEURONS, (1, 7, 32)))  # (B, D, S)


def sync_inputs(rng, batch, neurons, pairs, dtype):
    """Random pair indices, with repeated pairs and self-pairs whenever S > D."""
    left = rng.integers(0, neurons, pairs)
    right = rng.integers(0, neurons, pairs)
    right[: pairs // 4] = left[: pairs // 4]  # self-pairs: z[:, i] squared
    z = rng.standard_normal((batch, neurons))
    decay = rng.uniform(0.0, 1.0, pairs)
    alpha = rng.standard_normal((batch, pairs))
    beta = rng.uniform(0.0, 4.0, (batch, pairs))
    grads = [rng.standard_normal((batch, pairs)) for _ in range(3)]
    floats = [x.astype(dtype) for x in (z, decay, alpha, beta, *grads)]
    return floats[0], left, right, floats[1], floats[2], floats[3], floats[4:]


def torch_sync_update(z, left, right, decay, alpha, beta):
    alpha_new = decay * alpha + z[:, left] * z[:, right]
    beta_new = decay * beta + 1
    return alpha_new, beta_new, alpha_new / beta_new.sqrt()


def composed_sync_update(z, left, right, decay, alpha, beta):
    alpha_new = decay * alpha + ops.gather(z, left, axis=1) * ops.gather(z, right, axis=1)
    beta_new = decay * beta + 1.0
    return alpha_new, beta_new, alpha_new * ops.rsqrt(beta_new)


def sync_grads_of(fn, z, left, right, decay, alpha, beta, grads):
    def loss(z, decay, alpha, beta):
        outs = fn(z, left, right, decay, alpha, beta)
        return ops.sum(outs[0] * grads[0]) + ops.sum(outs[1] * grads[1]) + ops.sum(outs[2] * grads[2])

    return mg.value_and_grad(loss, argnums=(0, 1, 2, 3))(z, decay, alpha, beta)[1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch,neurons,pairs", SYNC_CASES)
def test_sync_update_matches_torch(rng, dtype, batch, neurons, pairs):
    z, left, right, decay, alpha, beta, grads = sync_inputs(rng, batch, neurons, pairs, dtype)
    tol = TOLERANCE[dtype]

    outs = ops.sync_update(z, left, right, decay, alpha, beta)
    tensors = [torch.tensor(x, requires_grad=True) for x in (z, decay, alpha, beta)]
    index = [torch.tensor(left), torch.tensor(right)]
    expected = torch_sync_update(tensors[0], *index, *tensors[1:])
    for name, got, want in zip(("alpha", "beta", "sync"), outs, expected):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=tol, atol=tol, err_msg=name)

    torch.autograd.backward(expected, [torch.tensor(g) for g in grads])
    got_grads = sync_grads_of(ops.sync_update, z, left, right, decay, alpha, beta, grads)
    for name, got, t in zip(("d_z", "d_decay", "d_alpha", "d_beta"), got_grads, tensors):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("batch,neurons,pairs", [(1, 1, 1), (3, 9, 32), (3, 512, 7)])
def test_sync_update_backward_matches_composition(rng, batch, neurons, pairs):
    z, left, right, decay, alpha, beta, grads = sync_inputs(rng, batch, neurons, pairs, np.float64)
    fused = ops.sync_update(z, left, right, decay, alpha, beta)
    composed = composed_sync_update(z, left, right, decay, alpha, beta)
    for name, got, expected in zip(("alpha", "beta", "sync"), fused, composed):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9, err_msg=name)
    fused = sync_grads_of(ops.sync_update, z, left, right, decay, alpha, beta, grads)
    composed = sync_grads_of(composed_sync_update, z, left, right, decay, alpha, beta, grads)
    for name, got, expected in zip(("d_z", "d_decay", "d_alpha", "d_beta"), fused, composed):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9, err_msg=name)


def test_sync_update_rejects_bad_inputs(rng):
    z, left, right, decay, alpha, beta, _ = sync_inputs(rng, 2, 9, 5, np.float32)
    with pytest.raises(ShapeError, match="pair indices must be integers"):
        ops.sync_update(z, left.astype(np.float32), right, decay, alpha, beta)
    with pytest.raises(ShapeError, match="pair counts differ"):
        ops.sync_update(z, left[:4], right, decay, alpha, beta)
    with pytest.raises(ShapeError, match="alpha and beta must be"):
        ops.sync_update(z, left, right, decay, alpha[:1], beta)
    with pytest.raises(ShapeError, match="one floating dtype"):
        ops.sync_update(z, left, right, decay.astype(np.float64), alpha, beta)


# --------------------------------------------------------------------------------------------
# Compiled, kernels on and off

HIDDEN = 32
COMPILED_SHAPES = [(512, 25, 3, 32), (9, 4, 1, 20), (37, 25, 6, 50)]  # (D, M, B, S); S > D repeats pairs
DIMS = (
    ("D", "B", "M"), ("D", "M", 2 * HIDDEN), ("D", 2 * HIDDEN), ("D", HIDDEN, 2), ("D", 2),
    ("S",), ("S",), ("S",), ("B", "S"), ("B", "S"), ("D", "B", 1), (("B", "S"),) * 3,
)
OUTPUT_NAMES = ("z", "alpha", "beta", "sync", "d_trace", "d_w1", "d_b1", "d_w2", "d_b2", "d_decay", "d_alpha", "d_beta")
KERNEL_OPS = ("nlm_forward_neuron_major", "nlm_backward_neuron_major", "sync_update", "sync_update_backward")


def nlm_and_sync(trace, w1, b1, w2, b2, left, right, decay, alpha, beta, grad_z, grads_sync):
    """Both NLM stages of a deep CTM, then a sync update of their output, and every gradient."""

    def loss(trace, w1, b1, w2, b2, decay, alpha, beta):
        h = ops.nlm_glu(ops.nlm_glu(trace, w1, b1), w2, b2)  # (D, B, 1)
        z = ops.transpose(ops.squeeze(h, -1), (1, 0))  # (B, D)
        outs = ops.sync_update(z, left, right, decay, alpha, beta)  # each (B, S)
        total = ops.sum(h * grad_z)
        for out, grad in zip(outs, grads_sync):
            total = total + ops.sum(out * grad)
        return total, (z, *outs)

    (_, outs), grads = mg.value_and_grad(loss, argnums=tuple(range(8)), has_aux=True)(
        trace, w1, b1, w2, b2, decay, alpha, beta
    )
    return [*outs, *grads]


def nlm_and_sync_inputs(rng, neurons, memory, batch, pairs):
    trace, w1, b1, _ = nlm_inputs(rng, neurons, memory, batch, HIDDEN, np.float32)
    _, w2, b2, grad_z = nlm_inputs(rng, neurons, HIDDEN, batch, 1, np.float32)
    _, left, right, decay, alpha, beta, grads = sync_inputs(rng, batch, neurons, pairs, np.float32)
    return [trace, w1, b1, w2, b2, left, right, decay, alpha, beta, grad_z, tuple(grads)]


def as_float64(inputs):
    """Copy float32 arrays (also inside tuples) to float64 and keep the integer indices."""
    out = []
    for x in inputs:
        if isinstance(x, tuple):
            out.append(tuple(as_float64(x)))
        elif x.dtype == np.float32:
            out.append(x.astype(np.float64))
        else:
            out.append(x)
    return out


def assert_close_f32(got, expected, name):
    atol = 1e-5 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.max
def test_compiled_fused_ops_kernels_on_and_off(rng):
    from modgrad.engine import compile as engine_compile

    for kernels in (True, False):
        fn = mg.compile(nlm_and_sync, dims=DIMS, kernels=kernels, name=f"fused_ops_kernels_{kernels}")
        for neurons, memory, batch, pairs in COMPILED_SHAPES:
            inputs = nlm_and_sync_inputs(rng, neurons, memory, batch, pairs)
            outs = fn(*inputs)
            expected = nlm_and_sync(*as_float64(inputs))
            where = f"kernels={kernels}, D {neurons}, M {memory}, B {batch}, S {pairs}"
            for name, got, want in zip(OUTPUT_NAMES, outs, expected, strict=True):
                assert got.dtype == np.float32, name
                assert_close_f32(got, want, f"{name} with {where}")

        # The graph of either setting is rebuilt (not compiled) to show which lowering it used.
        (plan, _, _), = fn._plans.values()
        (segment,) = [step for step in plan.steps if step.outputs]
        text = str(engine_compile._segment_graph(segment, "cpu", "fused_ops_inspect", plan.kernels))
        for op in KERNEL_OPS:
            assert (f'symbol = "{op}"' in text) == kernels, op


# --------------------------------------------------------------------------------------------
# Small-batch matmul

MATVEC_SHAPES = [((1, 1), (1, 1)), ((3, 1, 9), (9, 5)), ((2, 4, 59), (59, 96)), ((1, 1000), (1000, 3))]


@pytest.mark.parametrize("x_shape,w_shape", MATVEC_SHAPES)
def test_matvec_matches_torch(rng, x_shape, w_shape):
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    out = ops.matvec(x, w)
    grad = rng.standard_normal(out.shape)
    np.testing.assert_allclose(out, x @ w, rtol=1e-12, atol=1e-12)

    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
    (torch.matmul(tx, tw) * torch.tensor(grad)).sum().backward()
    dx, dw = mg.value_and_grad(lambda x, w: ops.sum(ops.matvec(x, w) * grad), argnums=(0, 1))(x, w)[1]
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-9, atol=1e-9)


def test_matvec_rejects_bad_shapes(rng):
    with pytest.raises(ShapeError, match=r"w \(K, N\)"):
        ops.matvec(rng.standard_normal((2, 3)), rng.standard_normal((2, 3, 4)))
    with pytest.raises(ShapeError, match="contraction sizes differ"):
        ops.matvec(rng.standard_normal((2, 3)), rng.standard_normal((4, 5)))


@pytest.mark.max
def test_compiled_matvec_kernels_on_and_off(rng):
    from modgrad.engine import compile as engine_compile

    def decode_products(x, w_in, w_out):
        return ops.matvec(ops.silu(ops.matvec(x, w_in)), w_out)  # (B, 1, K) -> (B, 1, N) -> (B, 1, K)

    dims = (("B", 1, 1000), (1000, "N"), ("N", 1000))
    for kernels in (True, False):
        fn = mg.compile(decode_products, dims=dims, kernels=kernels, name=f"matvec_kernels_{kernels}")
        for batch, hidden in ((1, 59), (9, 224)):
            x = rng.standard_normal((batch, 1, 1000)).astype(np.float32)
            w_in = (rng.standard_normal((1000, hidden)) / 32).astype(np.float32)
            w_out = (rng.standard_normal((hidden, 1000)) / 8).astype(np.float32)
            expected = decode_products(*(a.astype(np.float64) for a in (x, w_in, w_out)))
            assert_close_f32(fn(x, w_in, w_out), expected, f"kernels={kernels}, B {batch}, N {hidden}")

        (plan, _, _), = fn._plans.values()
        (segment,) = [step for step in plan.steps if step.outputs]
        text = str(engine_compile._segment_graph(segment, "cpu", "matvec_inspect", plan.kernels))
        assert ('symbol = "matvec"' in text) == kernels


# --------------------------------------------------------------------------------------------
# Trace window

WINDOW_SHAPES = [(1, 1, 1), (3, 2, 4), (512, 3, 25)]  # (D, B, M)


def window_loss(trace, new, weight):
    """Push twice. The first window is read twice, so its gradient arrives as a sum of two, and
    the second window's arrives whole."""
    pushed = ops.trace_push(trace, new)
    again = ops.trace_push(ops.tanh(pushed), new * 0.5)
    return ops.sum(pushed * weight) + ops.sum(ops.sin(again))


def torch_window_loss(trace, new, weight):
    pushed = torch.cat([trace[..., 1:], new[..., None]], -1)
    again = torch.cat([torch.tanh(pushed)[..., 1:], (new * 0.5)[..., None]], -1)
    return (pushed * weight).sum() + torch.sin(again).sum()


def window_inputs(rng, shape, dtype):
    return [rng.standard_normal(s).astype(dtype) for s in (shape, shape[:-1], shape)]


@pytest.mark.parametrize("shape", WINDOW_SHAPES)
def test_trace_push_matches_torch(rng, shape):
    trace, new, weight = window_inputs(rng, shape, np.float64)
    pushed = ops.trace_push(trace, new)
    np.testing.assert_array_equal(pushed, np.concatenate([trace[..., 1:], new[..., None]], -1))
    loss, grads = mg.value_and_grad(window_loss, argnums=(0, 1))(trace, new, weight)
    t_trace, t_new = (torch.tensor(a, requires_grad=True) for a in (trace, new))
    t_loss = torch_window_loss(t_trace, t_new, torch.tensor(weight))
    t_loss.backward()
    np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-12)
    for got, want in zip(grads, (t_trace.grad, t_new.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


def test_trace_push_rejects_bad_shapes():
    with pytest.raises(ShapeError, match="expected trace"):
        ops.trace_push(np.zeros((4, 3, 5)), np.zeros((3, 4)))
    with pytest.raises(ShapeError, match="dtype"):
        ops.trace_push(np.zeros((4, 5), np.float32), np.zeros(4))


@pytest.mark.max
def test_compiled_trace_push_kernels_on_and_off(rng):
    from modgrad.engine import compile as engine_compile

    grad_fn = mg.value_and_grad(window_loss, argnums=(0, 1))
    dims = (("D", "B", "M"), ("D", "B"), ("D", "B", "M"))
    for kernels in (True, False):
        fn = mg.compile(grad_fn, dims=dims, kernels=kernels, name=f"trace_push_kernels_{kernels}")
        for shape in WINDOW_SHAPES:
            inputs = window_inputs(rng, shape, np.float32)
            loss, grads = fn(*inputs)
            want_loss, want_grads = grad_fn(*(x.astype(np.float64) for x in inputs))
            np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
            for name, got, want in zip(("d_trace", "d_new"), grads, want_grads):
                assert_close_f32(got, want, f"{name} with kernels={kernels}, shape {shape}")

        (plan, _, _), = fn._plans.values()
        (segment,) = [step for step in plan.steps if step.outputs]
        text = str(engine_compile._segment_graph(segment, "cpu", "trace_push_inspect", plan.kernels))
        for op in ("trace_push", "trace_push_backward", "trace_push_backward_sum"):
            assert (f'symbol = "{op}"' in text) == kernels, op


# --------------------------------------------------------------------------------------------
# Layer norm and its gradient

NORM_SHAPES = [(1, 1, 1), (2, 3, 9), (4, 16, 441)]  # (A, B, D): the kernels get A * B rows


def norm_loss(x, gamma, beta, weight):
    """A plain layer norm feeding one with SiLU, so that both kernels run each way."""
    inner = ops.layer_norm(x, gamma, beta, activation="silu")
    return ops.sum(ops.sin(ops.layer_norm(inner * weight, gamma, beta)) * weight)


@pytest.mark.max
def test_compiled_layer_norm_kernels_on_and_off(rng):
    from modgrad.engine import compile as engine_compile

    grad_fn = mg.value_and_grad(norm_loss, argnums=(0, 1, 2))
    dims = (("A", "B", "D"), ("D",), ("D",), ("A", "B", "D"))
    for kernels in (True, False):
        fn = mg.compile(grad_fn, dims=dims, kernels=kernels, name=f"layer_norm_kernel_{kernels}")
        for a, b, d in NORM_SHAPES:
            inputs = [rng.standard_normal(s).astype(np.float32) for s in ((a, b, d), (d,), (d,), (a, b, d))]
            loss, grads = fn(*inputs)
            want_loss, want_grads = grad_fn(*(x.astype(np.float64) for x in inputs))
            np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
            for name, got, want in zip(("d_x", "d_gamma", "d_beta"), grads, want_grads):
                assert_close_f32(got, want, f"{name} with kernels={kernels}, shape {(a, b, d)}")

        (plan, _, _), = fn._plans.values()
        (segment,) = [step for step in plan.steps if step.outputs]
        text = str(engine_compile._segment_graph(segment, "cpu", "layer_norm_inspect", plan.kernels))
        for op in ("layer_norm", "layer_norm_silu", "layer_norm_backward", "layer_norm_silu_backward"):
            assert (f'symbol = "{op}"' in text) == kernels, op


def test_layer_norm_rejects_unknown_activation():
    x, gamma = np.ones((2, 3)), np.ones(3)
    with pytest.raises(ValueError, match="'gelu'"):
        ops.layer_norm(x, gamma, gamma, activation="gelu")
