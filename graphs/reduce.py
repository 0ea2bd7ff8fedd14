"""Reduction lowerings. MAX reductions keep the reduced axis with size 1; we squeeze when asked."""

from __future__ import annotations

from max.graph import ops

from modgrad.graphs import lowering, to_max_dtype


def _squeeze_axes(x, axes):
    for a in sorted(axes, reverse=True):
        x = ops.squeeze(x, a)
    return x


def _reduce(fn, x, axes, keepdims):
    for a in axes:
        x = fn(x, a)
    return x if keepdims else _squeeze_axes(x, axes)


@lowering("reduce_sum")
def _sum(x, device, axes, keepdims):
    return _reduce(lambda v, a: ops.sum(v, axis=a), x, axes, keepdims)


@lowering("reduce_max")
def _max(x, device, axes, keepdims):
    return _reduce(lambda v, a: ops.max(v, axis=a), x, axes, keepdims)


@lowering("argmax")
def _argmax(x, device, axis, keepdims):
    out = ops.argmax(x, axis=axis)
    out = out if keepdims else ops.squeeze(out, axis)
    return ops.cast(out, to_max_dtype("int64"))


@lowering("size_of")
def _size_of(x, device, axes, dtype):
    dims = [x.shape[a] for a in axes]
    if not dims:
        return ops.constant(1, to_max_dtype(dtype), device)
    sizes = ops.cast(ops.shape_to_tensor(dims), to_max_dtype(dtype))  # (len(axes),)
    total = sizes[0]
    for i in range(1, len(dims)):
        total = total * sizes[i]
    return ops.reshape(total, [])
