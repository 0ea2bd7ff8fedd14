"""Attention: one query over a token set, a decode step over a key/value cache, and causal prefill.

Single-query attention is the CTM's read of its observation: each batch row's one query per head
over the n tokens of that row, with no mask and no positions:

    out[b, h] = sum_j softmax_j(q[b, h] . k[b, j, h] / sqrt(dh)) v[b, j, h]

Compiled float32 programs run it as the Mojo kernel ``mha_single_query`` and its gradient as
``mha_single_query_backward``.

Decode attention takes one new token's query heads over the cache and the token itself:

    out[b, h] = sum_j softmax_j(q[b, h] . k_j[b, h // G] / sqrt(dh)) v_j[b, h // G]

over the L cached keys (past_k (L, B, H_kv, dh), the layout a decode loop appends to) and the
new key (k (B, H_kv, dh)). G = H / H_kv query heads share each key/value head. Compiled float32
programs run it as the Mojo kernel ``decode_attention``, which reads the cache where it lies.
The MAX built-in composition first transposes the cache, a copy of it per layer and token.

Causal attention runs every token of a sequence at once (a prompt's prefill, or training):
query t attends to key j where positions[j] <= positions[t]. Its kernel ``causal_attention`` reads
k and v once per key/value head. The composition repeats them for every query head of a
group and builds the (T, T) score matrix of every head.
"""

from __future__ import annotations

import numpy as np

from modgrad.engine.core import Primitive, ShapeError, bind, is_float, register


def _single_query_rule(q, k, v):
    (qs, qd), (ks, kd), (vs, vd) = q, k, v
    if not is_float(qd) or kd != qd or vd != qd:
        raise ShapeError(f"expected one floating dtype, got {qd}, {kd} and {vd}")
    if len(qs) != 3 or len(ks) != 4:
        raise ShapeError("expected q (B, H, dh), k and v (B, n, H, dh)")
    batch, heads, head_dim = qs
    if tuple(vs) != tuple(ks) or ks[0] != batch or tuple(ks[2:]) != (heads, head_dim):
        raise ShapeError(f"k {ks} and v {vs} must both be ({batch}, n, {heads}, {head_dim})")
    return [(qs, qd)]


def _single_query_probabilities(q, k):
    """Softmax weights (B, H, 1, n) of each query over its row's tokens."""
    scores = np.matmul(q[:, :, None, :], k.transpose(0, 2, 3, 1)) * q.shape[-1] ** -0.5  # (B, H, 1, n)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def _single_query_impl(q, k, v):
    p = _single_query_probabilities(q, k)
    out = np.matmul(p, v.transpose(0, 2, 1, 3))  # (B, H, 1, dh)
    return [out[:, :, 0].astype(q.dtype, copy=False)]


def _single_query_vjp(node, g):
    return bind(single_query_attention_backward_p, *node.inputs, g[0])


def _check_output_gradient(outputs: list, grad) -> None:
    """Raise ShapeError unless grad has the shape and dtype of the forward rule's single output."""
    (out_shape, dtype), = outputs
    if tuple(grad[0]) != tuple(out_shape) or grad[1] != dtype:
        raise ShapeError(f"the output gradient must be {out_shape} {dtype}, got {grad[0]} {grad[1]}")


def _single_query_backward_rule(q, k, v, grad):
    _check_output_gradient(_single_query_rule(q, k, v), grad)
    return [q, k, v]


def _single_query_backward_impl(q, k, v, grad):
    """Return the gradients of q, k and v (softmax VJP: p * (dp - sum(p dp)))."""
    p = _single_query_probabilities(q, k)  # (B, H, 1, n)
    g = grad[:, :, None, :]  # (B, H, 1, dh)
    dp = np.matmul(g, v.transpose(0, 2, 3, 1))  # (B, H, 1, n)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * q.shape[-1] ** -0.5
    d_q = np.matmul(ds, k.transpose(0, 2, 1, 3))[:, :, 0]  # (B, H, dh)
    d_k = np.matmul(ds.swapaxes(-1, -2), q[:, :, None, :]).transpose(0, 2, 1, 3)  # (B, n, H, dh)
    d_v = np.matmul(p.swapaxes(-1, -2), g).transpose(0, 2, 1, 3)
    return [np.ascontiguousarray(a, dtype=q.dtype) for a in (d_q, d_k, d_v)]


single_query_attention_p = register(
    Primitive("single_query_attention", _single_query_rule, _single_query_impl, _single_query_vjp)
)
# NOTE: no VJP, so a second derivative through single-query attention raises NotImplementedError.
single_query_attention_backward_p = register(
    Primitive(
        "single_query_attention_backward",
        _single_query_backward_rule,
        _single_query_backward_impl,
        multiple_results=True,
    )
)


# --------------------------------------------------------------------------------------------
# Decode attention over a key/value cache


def _decode_attention_rule(q, k, v, past_k, past_v):
    (qs, qd), (ks, kd), (vs, vd), (pks, pkd), (pvs, pvd) = q, k, v, past_k, past_v
    if not is_float(qd) or any(d != qd for d in (kd, vd, pkd, pvd)):
        raise ShapeError(f"expected one floating dtype, got {qd}, {kd}, {vd}, {pkd} and {pvd}")
    if len(qs) != 3 or len(ks) != 3 or len(pks) != 4:
        raise ShapeError("expected q (B, H, dh), k and v (B, H_kv, dh), past_k and past_v (L, B, H_kv, dh)")
    batch, heads, head_dim = qs
    kv_heads = ks[1]
    if tuple(vs) != tuple(ks) or ks[0] != batch or ks[2] != head_dim:
        raise ShapeError(f"k {ks} and v {vs} must both be (B, H_kv, dh) = ({batch}, H_kv, {head_dim})")
    if tuple(pvs) != tuple(pks) or tuple(pks[1:]) != tuple(ks):
        raise ShapeError(f"past_k {pks} and past_v {pvs} must both be (L, {batch}, {kv_heads}, {head_dim})")
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or kv_heads == 0 or heads % kv_heads:
        raise ShapeError(f"q's {heads} heads must be a static multiple of the {kv_heads} key/value heads")
    return [(qs, qd)]


def _grouped(q, kv_heads: int):
    batch, heads, head_dim = q.shape
    return q.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # (B, H_kv, G, dh)


def _probabilities(q, k, past_k):
    """Softmax weights over the cache and the new key: (B, H_kv, G, L) and (B, H_kv, G, 1)."""
    scale = q.shape[-1] ** -0.5
    qg = _grouped(q, k.shape[1])
    s_past = np.matmul(qg, past_k.transpose(1, 2, 3, 0)) * scale  # (B, H_kv, G, L)
    s_new = np.matmul(qg, k[:, :, :, None]) * scale  # (B, H_kv, G, 1)
    top = s_new if s_past.shape[-1] == 0 else np.maximum(s_past.max(-1, keepdims=True), s_new)
    e_past, e_new = np.exp(s_past - top), np.exp(s_new - top)
    denom = e_past.sum(-1, keepdims=True) + e_new
    return e_past / denom, e_new / denom


def _decode_attention_impl(q, k, v, past_k, past_v):
    p_past, p_new = _probabilities(q, k, past_k)
    out = np.matmul(p_past, past_v.transpose(1, 2, 0, 3)) + p_new * v[:, :, None, :]  # (B, H_kv, G, dh)
    return [out.reshape(q.shape).astype(q.dtype, copy=False)]


def _decode_attention_vjp(node, g):
    return bind(decode_attention_backward_p, *node.inputs, g[0])


def _decode_attention_backward_rule(q, k, v, past_k, past_v, grad):
    _check_output_gradient(_decode_attention_rule(q, k, v, past_k, past_v), grad)
    return [q, k, v, past_k, past_v]


def _decode_attention_backward_impl(q, k, v, past_k, past_v, grad):
    """Return the gradients of q, k, v, past_k and past_v (softmax VJP: p * (dp - sum(p dp)))."""
    scale = q.shape[-1] ** -0.5
    kv_heads = k.shape[1]
    p_past, p_new = _probabilities(q, k, past_k)
    qg, gg = _grouped(q, kv_heads), _grouped(grad, kv_heads)  # (B, H_kv, G, dh)
    v_past = past_v.transpose(1, 2, 0, 3)  # (B, H_kv, L, dh)
    dp_past = np.matmul(gg, v_past.swapaxes(-1, -2))  # (B, H_kv, G, L)
    dp_new = (gg * v[:, :, None, :]).sum(-1, keepdims=True)  # (B, H_kv, G, 1)
    mean = (p_past * dp_past).sum(-1, keepdims=True) + p_new * dp_new
    ds_past = p_past * (dp_past - mean) * scale
    ds_new = p_new * (dp_new - mean) * scale
    k_past = past_k.transpose(1, 2, 0, 3)  # (B, H_kv, L, dh)
    d_q = np.matmul(ds_past, k_past) + ds_new * k[:, :, None, :]
    d_k = (ds_new * qg).sum(2)  # (B, H_kv, dh)
    d_v = (p_new * gg).sum(2)
    d_past_k = np.matmul(ds_past.swapaxes(-1, -2), qg).transpose(2, 0, 1, 3)  # (L, B, H_kv, dh)
    d_past_v = np.matmul(p_past.swapaxes(-1, -2), gg).transpose(2, 0, 1, 3)
    grads = (d_q.reshape(q.shape), d_k, d_v, d_past_k, d_past_v)
    return [np.ascontiguousarray(a, dtype=q.dtype) for a in grads]


decode_attention_p = register(
    Primitive("decode_attention", _decode_attention_rule, _decode_attention_impl, _decode_attention_vjp)
)
# NOTE: no VJP, so a second derivative through decode attention raises NotImplementedError.
decode_attention_backward_p = register(
    Primitive(
        "decode_attention_backward",
        _decode_attention_backward_rule,
        _decode_attention_backward_impl,
        multiple_results=True,
    )
)


# --------------------------------------------------------------------------------------------
# Causal attention over a whole sequence (prefill and training)


def _causal_attention_rule(q, k, v, positions):
    (qs, qd), (ks, kd), (vs, vd), (ps, pd) = q, k, v, positions
    if not is_float(qd) or kd != qd or vd != qd:
        raise ShapeError(f"expected one floating dtype, got {qd}, {kd} and {vd}")
    if not np.issubdtype(pd, np.integer):
        raise ShapeError(f"positions must be integers, got {pd}")
    if len(qs) != 4 or len(ks) != 4 or len(ps) != 1:
        raise ShapeError("expected q (B, T, H, dh), k and v (B, T, H_kv, dh) and positions (T,)")
    batch, tokens, heads, head_dim = qs
    kv_heads = ks[2]
    if tuple(vs) != tuple(ks) or tuple(ks[:2]) != (batch, tokens) or ks[3] != head_dim:
        raise ShapeError(f"k {ks} and v {vs} must both be ({batch}, {tokens}, H_kv, {head_dim})")
    if ps[0] != tokens:
        raise ShapeError(f"positions {ps} must have one entry per token ({tokens})")
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or kv_heads == 0 or heads % kv_heads:
        raise ShapeError(f"q's {heads} heads must be a static multiple of the {kv_heads} key/value heads")
    return [(qs, qd)]


def _by_group(x, kv_heads: int):
    """(B, T, H, dh) -> (B, H_kv, G, T, dh)."""
    batch, tokens, heads, head_dim = x.shape
    return x.reshape(batch, tokens, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)


def _by_token(x):
    """(B, H_kv, G, T, dh) -> (B, T, H, dh)."""
    batch, kv_heads, group, tokens, head_dim = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(batch, tokens, kv_heads * group, head_dim)


def _causal_probabilities(q, k, positions):
    """Softmax weights (B, H_kv, G, T, T): query t attends to key j where positions[j] <= positions[t]."""
    scale = q.shape[-1] ** -0.5
    qg = _by_group(q, k.shape[2])
    keys = k.transpose(0, 2, 3, 1)[:, :, None]  # (B, H_kv, 1, dh, T)
    visible = positions[:, None] >= positions[None, :]  # (T, T) query, key
    scores = np.where(visible, np.matmul(qg, keys) * scale, -np.inf)  # a token always attends to itself
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def _causal_attention_impl(q, k, v, positions):
    p = _causal_probabilities(q, k, positions)
    out = np.matmul(p, v.transpose(0, 2, 1, 3)[:, :, None])  # (B, H_kv, G, T, dh)
    return [_by_token(out).astype(q.dtype, copy=False)]


def _causal_attention_vjp(node, g):
    d_q, d_k, d_v = bind(causal_attention_backward_p, *node.inputs, g[0])
    return [d_q, d_k, d_v, None]


def _causal_attention_backward_rule(q, k, v, positions, grad):
    _check_output_gradient(_causal_attention_rule(q, k, v, positions), grad)
    return [q, k, v]


def _causal_attention_backward_impl(q, k, v, positions, grad):
    """Return the gradients of q, k and v; the key/value ones sum over each group's query heads."""
    scale = q.shape[-1] ** -0.5
    kv_heads = k.shape[2]
    p = _causal_probabilities(q, k, positions)  # (B, H_kv, G, T, T)
    qg, gg = _by_group(q, kv_heads), _by_group(grad, kv_heads)  # (B, H_kv, G, T, dh)
    keys = k.transpose(0, 2, 1, 3)[:, :, None]  # (B, H_kv, 1, T, dh)
    values = v.transpose(0, 2, 1, 3)[:, :, None]
    dp = np.matmul(gg, values.swapaxes(-1, -2))  # (B, H_kv, G, T, T)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
    d_q = _by_token(np.matmul(ds, keys))
    d_k = np.matmul(ds.swapaxes(-1, -2), qg).sum(2).transpose(0, 2, 1, 3)  # (B, T, H_kv, dh)
    d_v = np.matmul(p.swapaxes(-1, -2), gg).sum(2).transpose(0, 2, 1, 3)
    return [np.ascontiguousarray(a, dtype=q.dtype) for a in (d_q, d_k, d_v)]


causal_attention_p = register(
    Primitive("causal_attention", _causal_attention_rule, _causal_attention_impl, _causal_attention_vjp)
)
# NOTE: no VJP, so a second derivative through causal attention raises NotImplementedError.
causal_attention_backward_p = register(
    Primitive(
        "causal_attention_backward",
        _causal_attention_backward_rule,
        _causal_attention_backward_impl,
        multiple_results=True,
    )
)
