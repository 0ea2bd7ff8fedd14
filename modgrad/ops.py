"""The public op set. Model code is written with these and runs eagerly, traced or compiled.

Every function takes numpy arrays or traced values. Python scalars adopt the dtype of the tensor
they meet, as in numpy's weak scalar typing. Composite ops (softmax, layer_norm, ...) are written
with the primitives, so their gradients come from the primitives' VJPs.
"""

from __future__ import annotations

import builtins
from typing import Sequence

import numpy as np

from modgrad.engine.core import Value, bind, normalize_axes
from modgrad.engine.prims import attention, control, elementwise as ew, fused, linalg, norm, reduce as red, shape as sh
from modgrad.engine.prims.control import scan

__all__ = [
    "abs", "add", "argmax", "broadcast_to", "cast", "clip", "concat", "cos", "div", "equal", "exp",
    "expand_dims", "gather", "greater", "greater_equal", "layer_norm", "log", "log_softmax", "logsumexp",
    "matmul", "max", "maximum", "mean", "min", "minimum", "mul", "neg", "one_hot", "ones", "pow", "relu",
    "reshape", "rms_norm", "rsqrt", "scan", "sigmoid", "silu", "sin", "slice_axis", "softmax", "sqrt",
    "square", "squeeze", "stack", "stop_gradient", "sub", "sum", "tanh", "transpose", "var", "where",
    "zeros", "glu", "matvec", "nlm_glu", "trace_push", "sync_update", "single_query_attention", "decode_attention",
    "causal_attention", "shape_of", "dtype_of",
]


def shape_of(x) -> tuple:
    return tuple(x.shape) if isinstance(x, Value) else np.shape(x)


def dtype_of(x) -> np.dtype:
    return x.dtype if isinstance(x, Value) else np.asarray(x).dtype


def _is_tensor(x) -> bool:
    """Values and numpy arrays (0-d included) carry a dtype; Python scalars adopt one."""
    return isinstance(x, (Value, np.ndarray, np.generic))


def _coerce(x, y):
    """Give Python scalars the dtype of the tensor on the other side, as numpy does."""
    xt, yt = _is_tensor(x), _is_tensor(y)
    if xt and not yt:
        y = np.asarray(y, dtype=dtype_of(x))
    elif yt and not xt:
        x = np.asarray(x, dtype=dtype_of(y))
    elif xt and yt and dtype_of(x) != dtype_of(y):
        # A 0-d constant meeting a traced value adopts its dtype (weak typing of constants).
        if not isinstance(y, Value) and np.ndim(y) == 0 and isinstance(x, Value):
            y = np.asarray(y, dtype=dtype_of(x))
        elif not isinstance(x, Value) and np.ndim(x) == 0 and isinstance(y, Value):
            x = np.asarray(x, dtype=dtype_of(y))
    else:
        x = x if isinstance(x, Value) else np.asarray(x)
        y = y if isinstance(y, Value) else np.asarray(y)
    return x, y


# --------------------------------------------------------------------------------------------
# Elementwise


def add(x, y): return bind(ew.add_p, *_coerce(x, y))
def sub(x, y): return bind(ew.sub_p, *_coerce(x, y))
def mul(x, y): return bind(ew.mul_p, *_coerce(x, y))
def div(x, y): return bind(ew.div_p, *_coerce(x, y))
def pow(x, y): return bind(ew.pow_p, *_coerce(x, y))
def maximum(x, y): return bind(ew.maximum_p, *_coerce(x, y))
def minimum(x, y): return bind(ew.minimum_p, *_coerce(x, y))
def greater(x, y): return bind(ew.greater_p, *_coerce(x, y))
def greater_equal(x, y): return bind(ew.greater_equal_p, *_coerce(x, y))
def equal(x, y): return bind(ew.equal_p, *_coerce(x, y))
def neg(x): return bind(ew.neg_p, x)
def exp(x): return bind(ew.exp_p, x)
def log(x): return bind(ew.log_p, x)
def tanh(x): return bind(ew.tanh_p, x)
def sigmoid(x): return bind(ew.sigmoid_p, x)
def sqrt(x): return bind(ew.sqrt_p, x)
def rsqrt(x): return bind(ew.rsqrt_p, x)
def abs(x): return bind(ew.abs_p, x)
def sin(x): return bind(ew.sin_p, x)
def cos(x): return bind(ew.cos_p, x)
def stop_gradient(x): return bind(ew.stop_gradient_p, x)


def square(x):
    return mul(x, x)


def silu(x):
    return bind(ew.silu_p, x)


def relu(x):
    return maximum(x, 0.0)


def clip(x, lo: float, hi: float):
    """Clamp to [lo, hi]; the gradient is 1 inside the interval and 0 outside, as in torch.clamp."""
    return minimum(maximum(x, lo), hi)


def where(cond, x, y):
    if not _is_tensor(x) and not _is_tensor(y):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    x, y = _coerce(x, y)
    return bind(ew.where_p, cond, x, y)


def cast(x, dtype):
    dtype = np.dtype(dtype)
    if dtype_of(x) == dtype:
        return x
    return bind(ew.cast_p, x, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Reductions


def _axes(x, axis):
    return normalize_axes(axis, len(shape_of(x)))


def sum(x, axis=None, keepdims: bool = False):
    return bind(red.reduce_sum_p, x, axes=_axes(x, axis), keepdims=keepdims)


def max(x, axis=None, keepdims: bool = False):
    return bind(red.reduce_max_p, x, axes=_axes(x, axis), keepdims=keepdims)


def min(x, axis=None, keepdims: bool = False):
    return neg(max(neg(x), axis=axis, keepdims=keepdims))


def mean(x, axis=None, keepdims: bool = False):
    axes = _axes(x, axis)
    count = bind(red.size_of_p, x, axes=axes, dtype=dtype_of(x))
    return div(sum(x, axes, keepdims), count)


def var(x, axis=None, keepdims: bool = False):
    """Biased variance (divides by N), as LayerNorm uses."""
    mu = mean(x, axis, keepdims=True)
    return mean(square(sub(x, mu)), axis, keepdims)


def argmax(x, axis: int = -1, keepdims: bool = False):
    return bind(red.argmax_p, x, axis=_axes(x, axis)[0], keepdims=keepdims)


# --------------------------------------------------------------------------------------------
# Linear algebra


def matmul(a, b):
    """numpy.matmul semantics, including 1-D operands and broadcast batch axes."""
    a = a if isinstance(a, Value) else np.asarray(a)
    b = b if isinstance(b, Value) else np.asarray(b)
    a_vec, b_vec = len(shape_of(a)) == 1, len(shape_of(b)) == 1
    if a_vec:
        a = reshape(a, (1,) + shape_of(a))
    if b_vec:
        b = reshape(b, shape_of(b) + (1,))
    out = bind(linalg.matmul_p, a, b)
    if a_vec:
        out = squeeze(out, -2)
    if b_vec:
        out = squeeze(out, -1)
    return out


# --------------------------------------------------------------------------------------------
# Shapes


def reshape(x, shape: Sequence):
    shape = tuple(shape)
    if -1 in shape:
        src = shape_of(x)
        if any(isinstance(d, str) for d in src) or any(isinstance(d, str) for d in shape):
            raise ValueError(f"reshape with -1 needs static sizes; got {src} -> {shape}")
        known = int(np.prod([d for d in shape if d != -1]))
        shape = tuple(int(np.prod(src)) // known if d == -1 else d for d in shape)
    if shape == shape_of(x):
        return x
    return bind(sh.reshape_p, x, shape=shape)


def transpose(x, perm: Sequence[int] | None = None):
    rank = len(shape_of(x))
    perm = tuple(reversed(range(rank))) if perm is None else tuple(p % rank for p in perm)
    return bind(sh.transpose_p, x, perm=perm)


def swapaxes(x, a: int, b: int):
    perm = list(range(len(shape_of(x))))
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, perm)


def broadcast_to(x, shape: Sequence):
    if tuple(shape) == shape_of(x):
        return x
    return bind(sh.broadcast_to_p, x, shape=tuple(shape))


def expand_dims(x, axis: int):
    shape = list(shape_of(x))
    axis = axis % (len(shape) + 1)
    shape.insert(axis, 1)
    return reshape(x, shape)


def squeeze(x, axis: int):
    shape = list(shape_of(x))
    if shape[axis] != 1:
        raise ValueError(f"cannot squeeze axis {axis} of size {shape[axis]}")
    del shape[axis]
    return reshape(x, shape)


def concat(xs: Sequence, axis: int = 0):
    xs = [x if isinstance(x, Value) else np.asarray(x) for x in xs]
    if len(xs) == 1:
        return xs[0]
    axis = axis % len(shape_of(xs[0]))
    return bind(sh.concat_p, *xs, axis=axis)


def stack(xs: Sequence, axis: int = 0):
    return concat([expand_dims(x, axis) for x in xs], axis)


def slice_axis(x, axis: int, start: int, stop: int):
    """x[..., start:stop, ...] along one axis (unit step)."""
    shape = shape_of(x)
    axis = axis % len(shape)
    starts = [0] * len(shape)
    stops = list(shape)
    starts[axis], stops[axis] = start, stop
    return bind(sh.slice_p, x, starts=tuple(starts), stops=tuple(stops))


def getitem(x, idx):
    """Basic indexing: ints, slices (any step) and one ellipsis; integer arrays go through gather."""
    shape = shape_of(x)
    if not isinstance(idx, tuple):
        idx = (idx,)
    if Ellipsis in idx:
        i = idx.index(Ellipsis)
        idx = idx[:i] + (slice(None),) * (len(shape) - len(idx) + 1) + idx[i + 1 :]
    idx = idx + (slice(None),) * (len(shape) - len(idx))
    out = x
    drop = []
    for axis, item in enumerate(idx):
        d = shape[axis]
        if isinstance(item, (int, np.integer)):
            if isinstance(d, int) and not -d <= int(item) < d:
                raise IndexError(f"index {item} is out of range for axis {axis} of size {d}")
            i = int(item) % d
            out = slice_axis(out, axis, i, i + 1)
            drop.append(axis)
        elif isinstance(item, slice):
            if isinstance(d, str):
                if item != slice(None):
                    raise ValueError(f"a symbolic axis {d!r} can only be indexed with ':'")
                continue
            start, stop, step = item.indices(d)
            if step == 1:
                if (start, stop) != (0, d):
                    out = slice_axis(out, axis, start, builtins.max(start, stop))
            else:
                out = gather(out, np.arange(start, stop, step, dtype=np.int64), axis)
        else:
            out = gather(out, item, axis)
    for axis in reversed(drop):
        out = squeeze(out, axis)
    return out


def gather(x, indices, axis: int = 0):
    """np.take: select entries of ``x`` along ``axis`` by an integer index array (traced or constant)."""
    if not isinstance(indices, Value):
        indices = np.asarray(indices)
        if not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"gather indices must be integers, got {indices.dtype}")
        indices = indices.astype(np.int64)
    return bind(sh.take_p, x, indices, axis=axis % len(shape_of(x)))


def zeros(shape: Sequence, dtype=np.float32):
    return np.zeros(tuple(shape), dtype) if all(isinstance(d, int) for d in shape) else broadcast_to(
        np.zeros((), dtype), shape
    )


def ones(shape: Sequence, dtype=np.float32):
    return np.ones(tuple(shape), dtype) if all(isinstance(d, int) for d in shape) else broadcast_to(
        np.ones((), dtype), shape
    )


def one_hot(indices, n: int, dtype=np.float32):
    """(…,) integer ids -> (…, n) one-hot rows."""
    ids = indices if isinstance(indices, Value) else np.asarray(indices)
    return cast(equal(expand_dims(ids, -1), np.arange(n, dtype=dtype_of(ids))), dtype)


# --------------------------------------------------------------------------------------------
# Neural-network composites


def logsumexp(x, axis: int = -1, keepdims: bool = False):
    m = stop_gradient(max(x, axis, keepdims=True))
    out = add(log(sum(exp(sub(x, m)), axis, keepdims=True)), m)
    return out if keepdims else squeeze(out, axis)


def softmax(x, axis: int = -1):
    e = exp(sub(x, stop_gradient(max(x, axis, keepdims=True))))
    return div(e, sum(e, axis, keepdims=True))


def log_softmax(x, axis: int = -1):
    return sub(x, logsumexp(x, axis, keepdims=True))


def layer_norm(x, gamma, beta, eps: float = 1e-5, activation: str = "none"):
    """Normalise the last axis with biased variance, then scale and shift, then apply
    ``activation`` ("none" or "silu").

    gamma and beta of shape (D,) for x (..., D) make one fused op; other broadcastable shapes
    use the composition.
    """
    if activation not in norm.ACTIVATIONS:
        raise ValueError(f"layer_norm activation must be one of {norm.ACTIVATIONS}, got {activation!r}")
    parts = (x, gamma, beta)
    last = shape_of(x)[-1:]
    if (all(_is_tensor(a) for a in parts) and shape_of(gamma) == last == shape_of(beta)
            and dtype_of(gamma) == dtype_of(x) == dtype_of(beta)):
        return bind(norm.layer_norm_p, x, gamma, beta, eps=float(eps), activation=activation)
    mu = mean(x, -1, keepdims=True)
    xc = sub(x, mu)
    inv = rsqrt(add(mean(square(xc), -1, keepdims=True), eps))
    y = add(mul(mul(xc, inv), gamma), beta)
    return silu(y) if activation == "silu" else y


def rms_norm(x, weight, eps: float = 1e-6):
    inv = rsqrt(add(mean(square(x), -1, keepdims=True), eps))
    return mul(mul(x, inv), weight)


def matvec(x, w):
    """``x @ w`` for a few rows of x (..., K) against a weight matrix w (K, N) -> (..., N).

    Same math as :func:`matmul`, for decode-sized products whose cost is reading ``w`` once.
    Compiled float32 programs run it as the Mojo small-batch kernel unless kernels are
    switched off (see ``modgrad.compile``); with many rows ``matmul`` is the faster choice.
    """
    x = x if isinstance(x, Value) else np.asarray(x)
    w = w if isinstance(w, Value) else np.asarray(w)
    return bind(fused.matvec_p, x, w)


def single_query_attention(q, k, v):
    """Attend one query per batch row and head over that row's n tokens.

    q is (B, H, dh), k and v are (B, n, H, dh). Returns softmax(q . k / sqrt(dh)) v, (B, H, dh).
    Compiled float32 programs run the Mojo kernel unless kernels are switched off (see
    ``modgrad.compile``).
    """
    args = [x if isinstance(x, Value) else np.asarray(x) for x in (q, k, v)]
    return bind(attention.single_query_attention_p, *args)


def decode_attention(q, k, v, past_k, past_v):
    """Attend one new token over a key/value cache and itself, with grouped-query heads.

    q is (B, H, dh). k and v are the new token's key and value, (B, H_kv, dh). past_k and past_v
    are the cache, (L, B, H_kv, dh), and L may be 0. Query head h reads key/value head
    h // (H / H_kv). Returns (B, H, dh). Compiled float32 programs run the Mojo kernel, which
    reads the cache in place, unless kernels are switched off (see ``modgrad.compile``).
    """
    args = [x if isinstance(x, Value) else np.asarray(x) for x in (q, k, v, past_k, past_v)]
    return bind(attention.decode_attention_p, *args)


def causal_attention(q, k, v, positions):
    """Attend T tokens causally with grouped-query heads.

    Query t attends to key j where positions[j] <= positions[t]. q is (B, T, H, dh), k and v
    are (B, T, H_kv, dh) and positions is (T,) integers. Query head h reads key/value head
    h // (H / H_kv). Returns (B, T, H, dh). Compiled float32 programs run the Mojo kernel
    unless kernels are switched off (see ``modgrad.compile``).
    """
    args = [x if isinstance(x, Value) else np.asarray(x) for x in (q, k, v, positions)]
    return bind(attention.causal_attention_p, *args)


def glu(x, axis: int = -1):
    """First half is the value, second half the gate: a[:k] * sigmoid(a[k:])."""
    n = shape_of(x)[axis]
    if not isinstance(n, int) or n % 2:
        raise ValueError(f"glu needs an even static size on axis {axis}, got {n}")
    k = n // 2
    return mul(slice_axis(x, axis, 0, k), sigmoid(slice_axis(x, axis, k, n)))


def nlm_glu(trace, w, b):
    """Apply each neuron's own linear map to its trace window, then a GLU on the last axis.

    trace (D, B, M), w (D, M, 2H), b (D, 2H) -> (D, B, H). Computes
    ``glu(matmul(trace, w) + expand_dims(b, 1))`` as one op. Compiled float32 programs run it
    and its gradient as Mojo kernels unless kernels are switched off (see ``modgrad.compile``).
    """
    trace = trace if isinstance(trace, Value) else np.asarray(trace)
    w = w if isinstance(w, Value) else np.asarray(w)
    b = b if isinstance(b, Value) else np.asarray(b)
    return bind(fused.nlm_glu_p, trace, w, b)


def trace_push(trace, new):
    """Drop the oldest slot of each window and append ``new``: trace (..., M), new (...) -> (..., M).

    Computes ``concat([trace[..., 1:], expand_dims(new, -1)], -1)`` as one op. Compiled float32
    programs run it and its gradient as Mojo kernels unless kernels are switched off.
    """
    trace = trace if isinstance(trace, Value) else np.asarray(trace)
    new = new if isinstance(new, Value) else np.asarray(new)
    return bind(fused.trace_push_p, trace, new)


def sync_update(z, left, right, decay, alpha, beta):
    """Update the decayed pair accumulators of a CTM synchronisation and return (alpha', beta', sync).

    Shapes: z (B, D), the integer neuron indices left and right (S,), decay (S,), alpha and
    beta (B, S). Computes
    ``alpha' = decay * alpha + z[:, left] * z[:, right]``, ``beta' = decay * beta + 1`` and
    ``sync = alpha' / sqrt(beta')``, each (B, S), as one op. Compiled float32 programs run it
    and its gradient as Mojo kernels unless kernels are switched off (see ``modgrad.compile``).
    """
    args = [x if isinstance(x, Value) else np.asarray(x) for x in (z, left, right, decay, alpha, beta)]
    return tuple(bind(fused.sync_update_p, *args))
