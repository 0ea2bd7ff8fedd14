"""Attention lowerings: the Mojo kernels, or the same math in MAX built-in ops."""

from __future__ import annotations

from max.dtype import DType
from max.graph import StaticDim, ops

from modgrad.graphs import kernels, lowering
from modgrad.graphs.reduce import max_last, sum_last


def _inverse_sqrt(dim, like):
    """1 / sqrt(dim) as a Python float for a static dim, else as a scalar tensor of like's dtype."""
    if isinstance(dim, StaticDim):
        return float(int(dim)) ** -0.5
    return ops.rsqrt(ops.squeeze(ops.shape_to_tensor([dim]), 0).cast(like.dtype).to(like.device))


def _single_query_probabilities(q, k):
    """Softmax weights (B, H, 1, n) and q as (B, H, 1, dh)."""
    scale = _inverse_sqrt(q.shape[2], q)
    q1 = ops.unsqueeze(q, 2)  # (B, H, 1, dh)
    scores = ops.matmul(q1, ops.permute(k, [0, 2, 3, 1])) * scale  # (B, H, 1, n)
    e = ops.exp(scores - ops.max(scores, axis=-1))
    return e / ops.sum(e, axis=-1), q1


@lowering("single_query_attention")
def _single_query_attention(q, k, v, device, kernel=False):
    if kernel and all(x.dtype == DType.float32 for x in (q, k, v)):
        return kernels.mha_single_query(q, k, v)
    p, _ = _single_query_probabilities(q, k)
    return ops.squeeze(ops.matmul(p, ops.permute(v, [0, 2, 1, 3])), 2)  # (B, H, dh)


@lowering("single_query_attention_backward")
def _single_query_attention_backward(q, k, v, grad, device, kernel=False):
    if kernel and all(x.dtype == DType.float32 for x in (q, k, v, grad)):
        return list(kernels.mha_single_query_backward(q, k, v, grad))
    scale = _inverse_sqrt(q.shape[2], q)
    p, q1 = _single_query_probabilities(q, k)
    g = ops.unsqueeze(grad, 2)  # (B, H, 1, dh)
    dp = ops.matmul(g, ops.permute(v, [0, 2, 3, 1]))  # (B, H, 1, n)
    ds = p * (dp - ops.sum(p * dp, axis=-1)) * scale
    d_q = ops.squeeze(ops.matmul(ds, ops.permute(k, [0, 2, 1, 3])), 2)  # (B, H, dh)
    d_k = ops.permute(ops.matmul(ops.permute(ds, [0, 1, 3, 2]), q1), [0, 2, 1, 3])  # (B, n, H, dh)
    d_v = ops.permute(ops.matmul(ops.permute(p, [0, 1, 3, 2]), g), [0, 2, 1, 3])
    return [d_q, d_k, d_v]


# --------------------------------------------------------------------------------------------
# Decode attention


def _grouped(x, kv_heads: int):
    """(B, H, dh) -> (B, H_kv, G, dh)."""
    return ops.reshape(x, [x.shape[0], kv_heads, int(x.shape[1]) // kv_heads, x.shape[2]])


def _probabilities(q, k, past_k):
    """Softmax weights over the cache and the new key: (B, H_kv, G, L) and (B, H_kv, G, 1)."""
    scale = float(int(q.shape[2])) ** -0.5
    qg = _grouped(q, int(k.shape[1]))
    s_past = ops.matmul(qg, ops.permute(past_k, [1, 2, 3, 0])) * scale  # (B, H_kv, G, L)
    s_new = ops.matmul(qg, ops.unsqueeze(k, -1)) * scale  # (B, H_kv, G, 1)
    top = ops.max(ops.max(s_past, axis=-1), s_new)
    e_past, e_new = ops.exp(s_past - top), ops.exp(s_new - top)
    denom = ops.sum(e_past, axis=-1) + e_new
    return e_past / denom, e_new / denom


@lowering("decode_attention")
def _decode_attention(q, k, v, past_k, past_v, device, kernel=False):
    if kernel and all(x.dtype == DType.float32 for x in (q, k, v, past_k, past_v)):
        return kernels.decode_attention(q, k, v, past_k, past_v)
    p_past, p_new = _probabilities(q, k, past_k)
    out = ops.matmul(p_past, ops.permute(past_v, [1, 2, 0, 3])) + p_new * ops.unsqueeze(v, 2)
    return ops.reshape(out, q.shape)


@lowering("decode_attention_backward")
def _decode_attention_backward(q, k, v, past_k, past_v, grad, device):
    scale = float(int(q.shape[2])) ** -0.5
    kv_heads = int(k.shape[1])
    p_past, p_new = _probabilities(q, k, past_k)
    qg, gg = _grouped(q, kv_heads), _grouped(grad, kv_heads)  # (B, H_kv, G, dh)
    v_past = ops.permute(past_v, [1, 2, 0, 3])  # (B, H_kv, L, dh)
    k_past = ops.permute(past_k, [1, 2, 0, 3])
    dp_past = ops.matmul(gg, ops.permute(v_past, [0, 1, 3, 2]))  # (B, H_kv, G, L)
    dp_new = sum_last(gg * ops.unsqueeze(v, 2), broadcast_input=True)  # (B, H_kv, G, 1), v broadcast over G
    mean = ops.sum(p_past * dp_past, axis=-1) + p_new * dp_new
    ds_past = p_past * (dp_past - mean) * scale
    ds_new = p_new * (dp_new - mean) * scale
    d_q = ops.matmul(ds_past, k_past) + ds_new * ops.unsqueeze(k, 2)
    d_k = ops.squeeze(ops.sum(ops.permute(ds_new * qg, [0, 1, 3, 2]), axis=-1), -1)  # (B, H_kv, dh)
    d_v = ops.squeeze(ops.sum(ops.permute(p_new * gg, [0, 1, 3, 2]), axis=-1), -1)
    d_past_k = ops.permute(ops.matmul(ops.permute(ds_past, [0, 1, 3, 2]), qg), [2, 0, 1, 3])  # (L, B, H_kv, dh)
    d_past_v = ops.permute(ops.matmul(ops.permute(p_past, [0, 1, 3, 2]), gg), [2, 0, 1, 3])
    return [ops.reshape(d_q, q.shape), d_k, d_v, d_past_k, d_past_v]


# --------------------------------------------------------------------------------------------
# Causal attention

# A masked score: finite, so a fully masked row cannot produce NaN, and exp of it less any real score is 0.
_MASKED = -3.0e38


def _repeat_heads(x, group: int):
    """(B, T, H_kv, dh) -> (B, H, T, dh), each key/value head repeated for its group of query heads.

    MAX 26.7 rejects batched matmuls of rank 5, so the composition copies k and v per query head.
    """
    batch, tokens, kv_heads, head_dim = x.shape
    x = ops.unsqueeze(ops.permute(x, [0, 2, 1, 3]), 2)  # (B, H_kv, 1, T, dh)
    x = ops.broadcast_to(x, [batch, kv_heads, group, tokens, head_dim])
    return ops.reshape(x, [batch, int(kv_heads) * group, tokens, head_dim])


def _causal_probabilities(q, k, positions):
    """Softmax weights (B, H, T, T) and the head-major q, k, with query t attending to keys at positions <= its own."""
    scale = float(int(q.shape[3])) ** -0.5
    group = int(q.shape[2]) // int(k.shape[2])
    qh = ops.permute(q, [0, 2, 1, 3])  # (B, H, T, dh)
    kh = _repeat_heads(k, group)
    scores = ops.matmul(qh, ops.permute(kh, [0, 1, 3, 2])) * scale  # (B, H, T, T)
    visible = ops.greater_equal(ops.unsqueeze(positions, -1), ops.unsqueeze(positions, 0))  # (T, T)
    masked = ops.where(visible, scores, ops.constant(_MASKED, scores.dtype, scores.device))
    # The (T, T) mask is broadcast over batch and heads, a fused input that MAX 26.7 reduces wrongly
    # over its last axis when T is symbolic, so both reductions take the workaround.
    e = ops.exp(masked - max_last(masked, broadcast_input=True))
    return e / sum_last(e, broadcast_input=True), qh, kh


def _sum_groups(x, kv_heads: int):
    """(B, H, T, dh) -> (B, T, H_kv, dh), summing the query heads of each group."""
    batch, heads, tokens, head_dim = x.shape
    x = ops.reshape(x, [batch, kv_heads, int(heads) // kv_heads, tokens, head_dim])
    return ops.permute(ops.squeeze(ops.sum(x, axis=2), 2), [0, 2, 1, 3])


@lowering("causal_attention")
def _causal_attention(q, k, v, positions, device, kernel=False):
    if kernel and all(x.dtype == DType.float32 for x in (q, k, v)):
        return kernels.causal_attention(q, k, v, positions)
    p, _, _ = _causal_probabilities(q, k, positions)
    out = ops.matmul(p, _repeat_heads(v, int(q.shape[2]) // int(k.shape[2])))  # (B, H, T, dh)
    return ops.permute(out, [0, 2, 1, 3])


@lowering("causal_attention_backward")
def _causal_attention_backward(q, k, v, positions, grad, device):
    scale = float(int(q.shape[3])) ** -0.5
    kv_heads = int(k.shape[2])
    p, qh, kh = _causal_probabilities(q, k, positions)
    vh = _repeat_heads(v, int(q.shape[2]) // kv_heads)
    gh = ops.permute(grad, [0, 2, 1, 3])  # (B, H, T, dh)
    dp = ops.matmul(gh, ops.permute(vh, [0, 1, 3, 2]))  # (B, H, T, T)
    ds = p * (dp - sum_last(p * dp, broadcast_input=True)) * scale
    d_q = ops.permute(ops.matmul(ds, kh), [0, 2, 1, 3])
    d_k = _sum_groups(ops.matmul(ops.permute(ds, [0, 1, 3, 2]), qh), kv_heads)
    d_v = _sum_groups(ops.matmul(ops.permute(p, [0, 1, 3, 2]), gh), kv_heads)
    return [d_q, d_k, d_v]
