"""Shape lowerings: reshape, transpose, broadcast, concat, slice, gather and scatter-add."""

from __future__ import annotations

from max.graph import ops

from modgrad.graphs import lowering, to_max_dtype


@lowering("reshape")
def _reshape(x, device, shape):
    return ops.reshape(x, list(shape))


@lowering("transpose")
def _transpose(x, device, perm):
    return ops.permute(x, list(perm))


@lowering("broadcast_to")
def _broadcast_to(x, device, shape):
    return ops.broadcast_to(x, list(shape))


@lowering("concat")
def _concat(*xs, device, axis):
    return ops.concat(list(xs), axis=axis)


@lowering("slice")
def _slice(x, device, starts, stops):
    index = []
    for d, lo, hi in zip(x.shape, starts, stops):
        index.append(slice(None) if isinstance(hi, str) else slice(lo, hi))
    return x[tuple(index)]


@lowering("take")
def _take(x, idx, device, axis):
    return ops.gather(x, ops.cast(idx, to_max_dtype("int64")), axis=axis)


@lowering("take_add")
def _take_add(g, idx, device, axis, size):
    """Scatter-add rows of ``g`` into zeros of length ``size`` on ``axis`` (duplicates accumulate)."""
    k = idx.rank
    pre = list(g.shape[:axis])
    post = list(g.shape[axis + k :])
    rank = len(pre) + 1 + len(post)
    flat_idx = ops.reshape(ops.cast(idx, to_max_dtype("int64")), [-1, 1])  # (n, 1)
    updates = ops.reshape(g, pre + [-1] + post)  # (pre..., n, post...)
    front = [len(pre)] + [i for i in range(rank) if i != len(pre)]
    updates = ops.permute(updates, front)  # (n, pre..., post...)
    zeros = ops.broadcast_to(ops.constant(0, g.dtype, device), [size] + pre + post)
    out = ops.scatter_nd_add(zeros, updates, flat_idx)  # (size, pre..., post...)
    back = list(range(1, len(pre) + 1)) + [0] + list(range(len(pre) + 1, rank))
    return ops.permute(out, back)
