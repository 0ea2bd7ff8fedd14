"""Decode attention lowerings: the Mojo kernel, or the same math in MAX built-in ops."""

from __future__ import annotations

from max.dtype import DType
from max.graph import ops

from modgrad.graphs import kernels, lowering


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
    dp_new = ops.sum(gg * ops.unsqueeze(v, 2), axis=-1)  # (B, H_kv, G, 1)
    mean = ops.sum(p_past * dp_past, axis=-1) + p_new * dp_new
    ds_past = p_past * (dp_past - mean) * scale
    ds_new = p_new * (dp_new - mean) * scale
    d_q = ops.matmul(ds_past, k_past) + ds_new * ops.unsqueeze(k, 2)
    d_k = ops.squeeze(ops.sum(ops.permute(ds_new * qg, [0, 1, 3, 2]), axis=-1), -1)  # (B, H_kv, dh)
    d_v = ops.squeeze(ops.sum(ops.permute(p_new * gg, [0, 1, 3, 2]), axis=-1), -1)
    d_past_k = ops.permute(ops.matmul(ops.permute(ds_past, [0, 1, 3, 2]), qg), [2, 0, 1, 3])  # (L, B, H_kv, dh)
    d_past_v = ops.permute(ops.matmul(ops.permute(p_past, [0, 1, 3, 2]), gg), [2, 0, 1, 3])
    return [ops.reshape(d_q, q.shape), d_k, d_v, d_past_k, d_past_v]
