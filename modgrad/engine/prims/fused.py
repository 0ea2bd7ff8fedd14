"""Fused primitives: one op for a chain of primitives that has a hand-written kernel.

Each fused primitive computes what a composition of the basic primitives computes, and its
numpy implementation is that composition. Its VJP is a second fused primitive whose numpy
implementation is the hand-derived backward. The MAX lowerings (``modgrad.graphs.fused``)
emit either a Mojo kernel or the MAX built-in composition; ``modgrad.compile(kernels=...)``
chooses.
"""

from __future__ import annotations

import numpy as np

from modgrad.engine.core import Primitive, ShapeError, Value, bind, is_float, register
from modgrad.engine.prims.elementwise import _sigmoid, add_p
from modgrad.engine.prims.linalg import _matmul_rule, _matmul_vjp

# --------------------------------------------------------------------------------------------
# Neuron-level model: a per-neuron linear map of the trace window, then a GLU


def _nlm_glu_rule(trace, w, b):
    (ts, td), (ws, wd), (bs, bd) = trace, w, b
    if len(ts) != 3 or len(ws) != 3 or len(bs) != 2:
        raise ShapeError("expected trace (D, B, M), w (D, M, 2H) and b (D, 2H)")
    if not is_float(td) or td != wd or td != bd:
        raise ShapeError(f"expected one floating dtype, got {td}, {wd} and {bd}")
    neurons, batch, memory = ts
    if ws[0] != neurons or bs[0] != neurons:
        raise ShapeError(f"neuron counts differ: trace {neurons}, w {ws[0]}, b {bs[0]}")
    if ws[1] != memory:
        raise ShapeError(f"w has {ws[1]} inputs per neuron but the trace window has {memory}")
    outputs = ws[2]
    if bs[1] != outputs:
        raise ShapeError(f"b has {bs[1]} outputs per neuron but w has {outputs}")
    if not isinstance(outputs, int) or outputs % 2:
        raise ShapeError(f"the GLU needs an even static number of outputs per neuron, got {outputs}")
    return [((neurons, batch, outputs // 2), td)]


def _pre_activations(trace, w, b):
    return np.matmul(trace, w) + b[:, None, :]  # (D, B, 2H)


def _nlm_glu_impl(trace, w, b):
    pre = _pre_activations(trace, w, b)
    hidden = pre.shape[-1] // 2
    return [(pre[..., :hidden] * _sigmoid(pre[..., hidden:])).astype(trace.dtype, copy=False)]


def _nlm_glu_vjp(node, g):
    trace, w, b = node.inputs
    return bind(nlm_glu_backward_p, trace, w, b, g[0])


def _nlm_glu_backward_rule(trace, w, b, grad):
    (out_shape, dtype), = _nlm_glu_rule(trace, w, b)
    if tuple(grad[0]) != tuple(out_shape) or grad[1] != dtype:
        raise ShapeError(f"the output gradient must be {out_shape} {dtype}, got {grad[0]} {grad[1]}")
    return [trace, w, b]


def _nlm_glu_backward_impl(trace, w, b, grad):
    """Return (d_trace, d_w, d_b): the gate's derivative is sigmoid' = s (1 - s)."""
    pre = _pre_activations(trace, w, b)
    hidden = pre.shape[-1] // 2
    value, gate = pre[..., :hidden], _sigmoid(pre[..., hidden:])
    d_pre = np.concatenate([grad * gate, grad * value * gate * (1 - gate)], axis=-1)  # (D, B, 2H)
    d_trace = np.matmul(d_pre, np.swapaxes(w, 1, 2))  # (D, B, M)
    d_w = np.matmul(np.swapaxes(trace, 1, 2), d_pre)  # (D, M, 2H)
    d_b = d_pre.sum(axis=1)  # (D, 2H)
    return [x.astype(trace.dtype, copy=False) for x in (d_trace, d_w, d_b)]


nlm_glu_p = register(Primitive("nlm_glu", _nlm_glu_rule, _nlm_glu_impl, _nlm_glu_vjp))
# NOTE: no VJP, so a second derivative through the NLM raises NotImplementedError.
nlm_glu_backward_p = register(
    Primitive("nlm_glu_backward", _nlm_glu_backward_rule, _nlm_glu_backward_impl, multiple_results=True)
)


# --------------------------------------------------------------------------------------------
# Pairwise synchronisation: decayed accumulators of neuron-pair products


def _sync_update_rule(z, left, right, decay, alpha, beta):
    (zs, zd), (ls, ld), (rs, rd), (ds, dd), (a_s, ad), (bs, bd) = z, left, right, decay, alpha, beta
    if len(zs) != 2 or len(ls) != 1 or len(rs) != 1 or len(ds) != 1:
        raise ShapeError("expected z (B, D), left (S,), right (S,) and decay (S,)")
    if not (np.issubdtype(ld, np.integer) and np.issubdtype(rd, np.integer)):
        raise ShapeError(f"pair indices must be integers, got {ld} and {rd}")
    if not is_float(zd) or any(d != zd for d in (dd, ad, bd)):
        raise ShapeError(f"expected one floating dtype, got {zd}, {dd}, {ad} and {bd}")
    pairs = ls[0]
    if rs[0] != pairs or ds[0] != pairs:
        raise ShapeError(f"pair counts differ: left {pairs}, right {rs[0]}, decay {ds[0]}")
    out = (zs[0], pairs)
    if tuple(a_s) != out or tuple(bs) != out:
        raise ShapeError(f"alpha and beta must be {out}, got {a_s} and {bs}")
    return [(out, zd)] * 3


def _sync_update_impl(z, left, right, decay, alpha, beta):
    alpha_new = decay * alpha + z[:, left] * z[:, right]
    beta_new = decay * beta + 1
    return [alpha_new, beta_new, alpha_new / np.sqrt(beta_new)]


def _sync_update_vjp(node, g):
    from modgrad.engine.autodiff import zeros_like

    grads = [zeros_like(out) if c is None else c for out, c in zip(node.outputs, g)]
    d_z, d_decay, d_alpha, d_beta = bind(sync_update_backward_p, *node.inputs, *grads)
    return [d_z, None, None, d_decay, d_alpha, d_beta]


def _sync_update_backward_rule(z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync):
    (out, dtype), _, _ = _sync_update_rule(z, left, right, decay, alpha, beta)
    for grad in (grad_alpha, grad_beta, grad_sync):
        if tuple(grad[0]) != tuple(out) or grad[1] != dtype:
            raise ShapeError(f"the output gradients must be {out} {dtype}, got {grad[0]} {grad[1]}")
    return [z, decay, alpha, beta]


def _sync_update_backward_impl(z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync):
    """Return (d_z, d_decay, d_alpha, d_beta), with the totals on alpha' and beta' first.

    sync = alpha' / sqrt(beta') passes grad_sync / sqrt(beta') on to alpha' and
    -grad_sync * sync / (2 beta') on to beta'.
    """
    z_left, z_right = z[:, left], z[:, right]
    alpha_new = decay * alpha + z_left * z_right
    beta_new = decay * beta + 1
    root = np.sqrt(beta_new)
    total_alpha = grad_alpha + grad_sync / root
    total_beta = grad_beta - grad_sync * (alpha_new / root) / (2 * beta_new)
    d_z = np.zeros_like(z)
    np.add.at(d_z, (slice(None), left), total_alpha * z_right)
    np.add.at(d_z, (slice(None), right), total_alpha * z_left)
    d_decay = (total_alpha * alpha + total_beta * beta).sum(axis=0)
    return [d_z, d_decay.astype(z.dtype, copy=False), decay * total_alpha, decay * total_beta]


sync_update_p = register(
    Primitive("sync_update", _sync_update_rule, _sync_update_impl, _sync_update_vjp, multiple_results=True)
)
# NOTE: no VJP, so a second derivative through the sync update raises NotImplementedError.
sync_update_backward_p = register(
    Primitive(
        "sync_update_backward", _sync_update_backward_rule, _sync_update_backward_impl, multiple_results=True
    )
)


# --------------------------------------------------------------------------------------------
# Small-batch matrix product: a few rows of activations against one weight matrix


def _matvec_rule(x, w):
    (xs, xd), (ws, _) = x, w
    if len(xs) < 2 or len(ws) != 2:
        raise ShapeError(f"expected x (..., K) with rank >= 2 and w (K, N), got {tuple(xs)} and {tuple(ws)}")
    if not is_float(xd):
        raise ShapeError(f"matvec needs floating x and w, got {xd}; cast them to float32")
    return _matmul_rule(x, w)


# The gradient is that of a matmul. The backward pass has as many rows as the forward, so it
# gains nothing from the small-batch kernel.
matvec_p = register(Primitive("matvec", _matvec_rule, lambda x, w: [np.matmul(x, w)], _matmul_vjp))


# --------------------------------------------------------------------------------------------
# Trace window: push one value per row into the last axis and drop the oldest slot


def _trace_push_rule(trace, new):
    (ts, td), (ns, nd) = trace, new
    if len(ts) < 1 or tuple(ns) != tuple(ts[:-1]):
        raise ShapeError(
            f"expected trace (..., M) and new shaped like trace without its last axis: trace {tuple(ts)} "
            f"needs new {tuple(ts[:-1])}, got {tuple(ns)}"
        )
    if not is_float(td) or td != nd:
        raise ShapeError(f"trace and new need one floating dtype, got {td} and {nd}. Cast both to float32 or float64")
    if isinstance(ts[-1], int) and ts[-1] < 1:
        raise ShapeError(f"the window needs at least one slot, got a trace of shape {tuple(ts)}")
    return [(tuple(ts), td)]


def _trace_push_impl(trace, new):
    return [np.concatenate([trace[..., 1:], new[..., None]], axis=-1)]


def _trace_push_vjp(node, g):
    grad = g[0]
    # The window's gradient is usually the sum of the next tick's and the NLM's. The backward op
    # reads both summands, so the sum is not written out first.
    # NOTE: only a loop's backward step drops the unread add. Outside loops the numpy evaluator
    # still computes it.
    producer = grad.node if isinstance(grad, Value) else None
    if producer is not None and producer.prim is add_p and all(
        isinstance(x, Value) and tuple(x.shape) == tuple(grad.shape) and x.dtype == grad.dtype
        for x in producer.inputs
    ):
        return list(bind(trace_push_backward_p, *producer.inputs))
    return list(bind(trace_push_backward_p, grad))


def _trace_push_backward_rule(*grads):
    if len(grads) not in (1, 2):
        raise ShapeError(f"expected one or two gradients, got {len(grads)}")
    shape, dtype = grads[0]
    if any(tuple(s) != tuple(shape) or d != dtype for s, d in grads):
        raise ShapeError(f"the gradients must share one shape and dtype, got {[tuple(s) for s, _ in grads]}")
    if len(shape) < 1 or not is_float(dtype):
        raise ShapeError(f"expected a floating gradient (..., M), got {tuple(shape)} {dtype}")
    return [(tuple(shape), dtype), (tuple(shape[:-1]), dtype)]


def _trace_push_backward_impl(*grads):
    """Return (d_trace, d_new) for the sum of ``grads``: the oldest slot was dropped, so it gets 0."""
    grad = grads[0] if len(grads) == 1 else grads[0] + grads[1]
    d_trace = np.concatenate([np.zeros_like(grad[..., :1]), grad[..., :-1]], axis=-1)
    return [d_trace, np.ascontiguousarray(grad[..., -1])]


trace_push_p = register(Primitive("trace_push", _trace_push_rule, _trace_push_impl, _trace_push_vjp))
# NOTE: no VJP, so a second derivative through the trace window raises NotImplementedError.
trace_push_backward_p = register(
    Primitive("trace_push_backward", _trace_push_backward_rule, _trace_push_backward_impl, multiple_results=True)
)
