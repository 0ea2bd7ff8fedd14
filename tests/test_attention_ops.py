"""``ops.single_query_attention``, ``ops.decode_attention`` and ``ops.causal_attention`` against torch
autograd, their shape checks, and compiled with the kernels on and off.

Shapes cover one token, the maze CTM's 121 observation tokens, an empty cache (L 0), one shared key/value head, Qwen2.5-0.5B's 14 query
heads over 2 key/value heads, head sizes 1, 3 and 64, and positions out of order or tied.
Tolerances: float64 matches torch to 1e-9, float32 to 1e-5 (rtol, and atol times the largest
magnitude of the expected array).
"""

from __future__ import annotations

import numpy as np
import pytest

import modgrad as mg
from modgrad import ops
from modgrad.engine.core import ShapeError

torch = pytest.importorskip("torch")

SINGLE_QUERY_CASES = [  # (B, n, H, dh)
    (1, 1, 1, 1),
    (2, 3, 4, 3),
    (3, 59, 8, 16),
    (8, 121, 4, 32),
    (1, 98, 14, 64),
]
CASES = [  # (B, L, H, H_kv, dh)
    (1, 0, 1, 1, 1),
    (2, 3, 4, 2, 3),
    (1, 59, 14, 2, 64),
    (3, 98, 6, 1, 9),
    (2, 1, 8, 8, 4),
]
TOLERANCE = {np.float64: 1e-9, np.float32: 1e-5}


def single_query_inputs(rng, batch, tokens, heads, head_dim, dtype):
    q = rng.standard_normal((batch, heads, head_dim))
    k, v = rng.standard_normal((2, batch, tokens, heads, head_dim))
    grad = rng.standard_normal((batch, heads, head_dim))
    return [x.astype(dtype) for x in (q, k, v, grad)]


def torch_single_query_attention(q, k, v):
    scores = torch.einsum("bhd,bnhd->bhn", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhn,bnhd->bhd", torch.softmax(scores, -1), v)


def decode_inputs(rng, batch, cached, heads, kv_heads, head_dim, dtype):
    q = rng.standard_normal((batch, heads, head_dim))
    k, v = rng.standard_normal((2, batch, kv_heads, head_dim))
    past_k, past_v = rng.standard_normal((2, cached, batch, kv_heads, head_dim))
    grad = rng.standard_normal((batch, heads, head_dim))
    return [x.astype(dtype) for x in (q, k, v, past_k, past_v, grad)]


def torch_decode_attention(q, k, v, past_k, past_v):
    batch, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    keys = torch.cat([past_k.permute(1, 2, 0, 3), k[:, :, None]], 2)  # (B, H_kv, L + 1, dh)
    values = torch.cat([past_v.permute(1, 2, 0, 3), v[:, :, None]], 2)
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    weights = torch.softmax(qg @ keys.transpose(-1, -2) / head_dim**0.5, -1)  # (B, H_kv, G, L + 1)
    return (weights @ values).reshape(batch, heads, head_dim)


def assert_close(got, expected, dtype, name):
    tol = TOLERANCE[dtype]
    atol = tol * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=tol, atol=atol, err_msg=name)


def lowers_to_kernel(fn, op: str) -> bool:
    """Rebuild (not compile) the graph of a compiled function's single segment; True if it calls the kernel op."""
    from modgrad.engine import compile as engine_compile

    (plan, _, _), = fn._plans.values()
    (segment,) = [step for step in plan.steps if step.outputs]
    text = str(engine_compile._segment_graph(segment, "cpu", f"{op}_inspect", plan.kernels))
    return f'symbol = "{op}"' in text


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch,tokens,heads,head_dim", SINGLE_QUERY_CASES)
def test_single_query_attention_matches_torch(rng, dtype, batch, tokens, heads, head_dim):
    *inputs, grad = single_query_inputs(rng, batch, tokens, heads, head_dim, dtype)
    out = ops.single_query_attention(*inputs)
    assert out.dtype == dtype
    tensors = [torch.tensor(x, requires_grad=True) for x in inputs]
    expected = torch_single_query_attention(*tensors)
    assert_close(out, expected.detach().numpy(), dtype, "output")

    expected.backward(torch.tensor(grad))
    loss = mg.value_and_grad(lambda *xs: ops.sum(ops.single_query_attention(*xs) * grad), argnums=(0, 1, 2))
    for name, got, t in zip(("d_q", "d_k", "d_v"), loss(*inputs)[1], tensors, strict=True):
        assert got.dtype == dtype, name
        assert got.shape == tuple(t.shape), name
        assert_close(got, t.grad.numpy(), dtype, name)


def test_single_query_attention_rejects_bad_shapes(rng):
    q, k, v, _ = single_query_inputs(rng, 2, 5, 4, 3, np.float32)
    with pytest.raises(ShapeError, match="must both be"):
        ops.single_query_attention(q[:, :3], k, v)
    with pytest.raises(ShapeError, match="must both be"):
        ops.single_query_attention(q, k, v[:, :4])
    with pytest.raises(ShapeError, match=r"expected q \(B, H, dh\)"):
        ops.single_query_attention(q, k[:, 0], v[:, 0])
    with pytest.raises(ShapeError, match="one floating dtype"):
        ops.single_query_attention(q, k.astype(np.float64), v)


@pytest.mark.max
def test_compiled_single_query_attention_kernels_on_and_off(rng):
    def attention_and_grads(q, k, v, grad):
        def loss(*xs):
            out = ops.single_query_attention(*xs)
            return ops.sum(out * grad), out

        (_, out), grads = mg.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [out, *grads]

    dims = (("B", 8, 16), ("B", "n", 8, 16), ("B", "n", 8, 16), ("B", 8, 16))
    for kernels in (True, False):
        fn = mg.compile(attention_and_grads, dims=dims, kernels=kernels, name=f"single_query_attention_kernels_{kernels}")
        for batch, tokens in ((1, 1), (16, 100), (3, 59)):
            inputs = single_query_inputs(rng, batch, tokens, 8, 16, np.float32)
            expected = attention_and_grads(*(x.astype(np.float64) for x in inputs))
            for name, got, want in zip(("out", "d_q", "d_k", "d_v"), fn(*inputs), expected, strict=True):
                assert got.dtype == np.float32, name
                assert_close(got, want, np.float32, f"{name} with kernels={kernels}, B {batch}, n {tokens}")

        assert lowers_to_kernel(fn, "mha_single_query") == kernels
        assert lowers_to_kernel(fn, "mha_single_query_backward") == kernels


# --------------------------------------------------------------------------------------------
# Decode attention


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch,cached,heads,kv_heads,head_dim", CASES)
def test_decode_attention_matches_torch(rng, dtype, batch, cached, heads, kv_heads, head_dim):
    *inputs, grad = decode_inputs(rng, batch, cached, heads, kv_heads, head_dim, dtype)
    out = ops.decode_attention(*inputs)
    assert out.dtype == dtype
    tensors = [torch.tensor(x, requires_grad=True) for x in inputs]
    expected = torch_decode_attention(*tensors)
    assert_close(out, expected.detach().numpy(), dtype, "output")

    expected.backward(torch.tensor(grad))
    loss = mg.value_and_grad(lambda *xs: ops.sum(ops.decode_attention(*xs) * grad), argnums=tuple(range(5)))
    names = ("d_q", "d_k", "d_v", "d_past_k", "d_past_v")
    for name, got, t in zip(names, loss(*inputs)[1], tensors, strict=True):
        assert got.dtype == dtype, name
        assert got.shape == tuple(t.shape), name
        assert_close(got, t.grad.numpy(), dtype, name)


def test_decode_attention_rejects_bad_shapes(rng):
    q, k, v, past_k, past_v, _ = decode_inputs(rng, 2, 3, 4, 2, 3, np.float32)
    with pytest.raises(ShapeError, match="static multiple"):
        ops.decode_attention(q[:, :3], k, v, past_k, past_v)
    with pytest.raises(ShapeError, match="past_k"):
        ops.decode_attention(q, k, v, past_k[:, :1], past_v)
    with pytest.raises(ShapeError, match="must both be"):
        ops.decode_attention(q, k, v[:, :1], past_k, past_v)
    with pytest.raises(ShapeError, match="one floating dtype"):
        ops.decode_attention(q, k.astype(np.float64), v, past_k, past_v)


@pytest.mark.max
def test_compiled_decode_attention_kernels_on_and_off(rng):
    def attention_and_grads(q, k, v, past_k, past_v, grad):
        def loss(*xs):
            out = ops.decode_attention(*xs)
            return ops.sum(out * grad), out

        (_, out), grads = mg.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)(q, k, v, past_k, past_v)
        return [out, *grads]

    dims = (("B", 14, 64), ("B", 2, 64), ("B", 2, 64), ("L", "B", 2, 64), ("L", "B", 2, 64), ("B", 14, 64))
    for kernels in (True, False):
        fn = mg.compile(attention_and_grads, dims=dims, kernels=kernels, name=f"decode_attention_kernels_{kernels}")
        for batch, cached in ((1, 7), (3, 224)):
            inputs = decode_inputs(rng, batch, cached, 14, 2, 64, np.float32)
            expected = attention_and_grads(*(x.astype(np.float64) for x in inputs))
            for name, got, want in zip(("out", "d_q", "d_k", "d_v", "d_past_k", "d_past_v"), fn(*inputs), expected,
                                       strict=True):
                assert got.dtype == np.float32, name
                assert_close(got, want, np.float32, f"{name} with kernels={kernels}, B {batch}, L {cached}")

        assert lowers_to_kernel(fn, "decode_attention") == kernels


# --------------------------------------------------------------------------------------------
# Causal attention

CAUSAL_CASES = [  # (B, T, H, H_kv, dh, positions)
    (1, 1, 1, 1, 1, "arange"),
    (2, 5, 4, 2, 3, "arange"),
    (1, 33, 14, 2, 64, "arange"),
    (3, 9, 6, 1, 9, "shuffled"),
    (2, 7, 8, 8, 4, "repeated"),
]


def causal_inputs(rng, batch, tokens, heads, kv_heads, head_dim, kind, dtype):
    q = rng.standard_normal((batch, tokens, heads, head_dim))
    k, v = rng.standard_normal((2, batch, tokens, kv_heads, head_dim))
    grad = rng.standard_normal((batch, tokens, heads, head_dim))
    if kind == "shuffled":
        positions = rng.permutation(tokens)
    elif kind == "repeated":
        positions = np.arange(tokens) // 2
    else:
        positions = np.arange(tokens)
    return [*(x.astype(dtype) for x in (q, k, v)), positions.astype(np.int64), grad.astype(dtype)]


def torch_causal_attention(q, k, v, positions):
    group = q.shape[2] // k.shape[2]
    keys = k.repeat_interleave(group, 2).transpose(1, 2)  # (B, H, T, dh)
    values = v.repeat_interleave(group, 2).transpose(1, 2)
    visible = positions[:, None] >= positions[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch,tokens,heads,kv_heads,head_dim,kind", CAUSAL_CASES)
def test_causal_attention_matches_torch(rng, dtype, batch, tokens, heads, kv_heads, head_dim, kind):
    q, k, v, positions, grad = causal_inputs(rng, batch, tokens, heads, kv_heads, head_dim, kind, dtype)
    out = ops.causal_attention(q, k, v, positions)
    assert out.dtype == dtype
    tensors = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    expected = torch_causal_attention(*tensors, torch.tensor(positions))
    assert_close(out, expected.detach().numpy(), dtype, "output")

    expected.backward(torch.tensor(grad))
    loss = mg.value_and_grad(lambda q, k, v: ops.sum(ops.causal_attention(q, k, v, positions) * grad),
                             argnums=(0, 1, 2))
    for name, got, t in zip(("d_q", "d_k", "d_v"), loss(q, k, v)[1], tensors, strict=True):
        assert got.dtype == dtype, name
        assert_close(got, t.grad.numpy(), dtype, name)


def test_causal_attention_rejects_bad_shapes(rng):
    q, k, v, positions, _ = causal_inputs(rng, 2, 5, 4, 2, 3, "arange", np.float32)
    with pytest.raises(ShapeError, match="static multiple"):
        ops.causal_attention(q[:, :, :3], k, v, positions)
    with pytest.raises(ShapeError, match="one entry per token"):
        ops.causal_attention(q, k, v, positions[:4])
    with pytest.raises(ShapeError, match="positions must be integers"):
        ops.causal_attention(q, k, v, positions.astype(np.float32))
    with pytest.raises(ShapeError, match="must both be"):
        ops.causal_attention(q, k, v[:, :4], positions)


@pytest.mark.max
def test_compiled_causal_attention_kernels_on_and_off(rng):
    def attention_and_grads(q, k, v, positions, grad):
        def loss(q, k, v):
            out = ops.causal_attention(q, k, v, positions)
            return ops.sum(out * grad), out

        (_, out), grads = mg.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [out, *grads]

    dims = (("B", "T", 14, 64), ("B", "T", 2, 64), ("B", "T", 2, 64), ("T",), ("B", "T", 14, 64))
    for kernels in (True, False):
        fn = mg.compile(attention_and_grads, dims=dims, kernels=kernels, name=f"causal_attention_kernels_{kernels}")
        for batch, tokens, kind in ((1, 7, "arange"), (3, 40, "shuffled")):
            inputs = causal_inputs(rng, batch, tokens, 14, 2, 64, kind, np.float32)
            expected = attention_and_grads(*(x.astype(np.float64) if x.dtype == np.float32 else x for x in inputs))
            for name, got, want in zip(("out", "d_q", "d_k", "d_v"), fn(*inputs), expected, strict=True):
                assert got.dtype == np.float32, name
                assert_close(got, want, np.float32, f"{name} with kernels={kernels}, B {batch}, T {tokens}")

        assert lowers_to_kernel(fn, "causal_attention") == kernels
