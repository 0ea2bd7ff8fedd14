"""Shape primitives: reshape, transpose, broadcast_to, concat, slice, take (gather) and its adjoint."""

from __future__ import annotations

import math

import numpy as np

from modgrad.engine.core import Primitive, ShapeError, Value, bind, broadcast_shapes, register


def _split_dims(shape):
    ints = math.prod(d for d in shape if isinstance(d, int))
    syms = sorted(d for d in shape if isinstance(d, str))
    return ints, syms


def _reshape_rule(x, shape):
    src, dtype = x
    if any(isinstance(d, int) and d < 0 for d in shape):
        raise ShapeError(f"target shape {shape} has a negative size")
    if _split_dims(src) != _split_dims(shape):
        raise ShapeError(f"cannot reshape {src} into {tuple(shape)}: element counts differ")
    return [(tuple(shape), dtype)]


reshape_p = register(
    Primitive(
        "reshape",
        _reshape_rule,
        lambda x, shape: [np.reshape(x, shape)],
        lambda n, g: [bind(reshape_p, g[0], shape=tuple(n.inputs[0].shape))],
    )
)


def _transpose_rule(x, perm):
    shape, dtype = x
    if sorted(perm) != list(range(len(shape))):
        raise ShapeError(f"perm {perm} is not a permutation of rank {len(shape)}")
    return [(tuple(shape[p] for p in perm), dtype)]


def _transpose_vjp(node, g):
    inverse = tuple(int(i) for i in np.argsort(node.attrs["perm"]))
    return [bind(transpose_p, g[0], perm=inverse)]


transpose_p = register(
    Primitive("transpose", _transpose_rule, lambda x, perm: [np.transpose(x, perm)], _transpose_vjp)
)


def _broadcast_rule(x, shape):
    src, dtype = x
    if len(src) > len(shape):
        raise ShapeError(f"cannot broadcast rank {len(src)} to rank {len(shape)}")
    if broadcast_shapes(src, tuple(shape)) != tuple(shape):
        raise ShapeError(f"cannot broadcast {src} to {tuple(shape)}")
    return [(tuple(shape), dtype)]


def _broadcast_vjp(node, g):
    from modgrad.engine.prims.elementwise import unbroadcast

    return [unbroadcast(g[0], node.inputs[0].shape)]


broadcast_to_p = register(
    Primitive(
        "broadcast_to",
        _broadcast_rule,
        lambda x, shape: [np.array(np.broadcast_to(x, shape))],
        _broadcast_vjp,
    )
)


def _concat_rule(*xs, axis):
    shape0, dtype = xs[0]
    rank = len(shape0)
    if not 0 <= axis < rank:
        raise ShapeError(f"axis {axis} out of range for rank {rank}")
    total = 0
    for shape, dt in xs:
        if dt != dtype:
            raise ShapeError(f"dtypes differ: {dtype} and {dt}")
        if len(shape) != rank or any(a != b for i, (a, b) in enumerate(zip(shape, shape0)) if i != axis):
            raise ShapeError(f"shapes {shape0} and {shape} differ off the concat axis {axis}")
        if not isinstance(shape[axis], int):
            raise ShapeError(f"cannot concat along symbolic axis {shape[axis]!r}")
        total += shape[axis]
    out = list(shape0)
    out[axis] = total
    return [(tuple(out), dtype)]


def _concat_vjp(node, g):
    axis = node.attrs["axis"]
    grads, start = [], 0
    for x in node.inputs:
        size = x.shape[axis]
        starts = [0] * g[0].ndim
        stops = list(g[0].shape)
        starts[axis], stops[axis] = start, start + size
        grads.append(bind(slice_p, g[0], starts=tuple(starts), stops=tuple(stops)))
        start += size
    return grads


concat_p = register(
    Primitive("concat", _concat_rule, lambda *xs, axis: [np.concatenate(xs, axis=axis)], _concat_vjp)
)


# --------------------------------------------------------------------------------------------
# Contiguous slice (unit step); strided selection goes through take.


def _slice_rule(x, starts, stops):
    shape, dtype = x
    if len(starts) != len(shape) or len(stops) != len(shape):
        raise ShapeError(f"slice bounds {starts}:{stops} do not match rank {len(shape)}")
    out = []
    for d, lo, hi in zip(shape, starts, stops):
        if isinstance(d, str):
            if lo != 0 or hi != d:
                raise ShapeError(f"a symbolic axis {d!r} can only be sliced whole")
            out.append(d)
            continue
        if not 0 <= lo <= hi <= d:
            raise ShapeError(f"slice {lo}:{hi} is out of bounds for size {d}")
        out.append(hi - lo)
    return [(tuple(out), dtype)]


def _slice_impl(x, starts, stops):
    idx = tuple(slice(lo, hi if isinstance(hi, int) else None) for lo, hi in zip(starts, stops))
    return [np.ascontiguousarray(x[idx])]


def _slice_vjp(node, g):
    """Pad the cotangent with zeros back to the input's shape, one sliced axis at a time."""
    x = node.inputs[0]
    out = g[0]
    for axis, (d, lo, hi) in enumerate(zip(x.shape, node.attrs["starts"], node.attrs["stops"])):
        if isinstance(d, str) or (lo == 0 and hi == d):
            continue
        blocks = []
        if lo > 0:
            blocks.append(_zeros_like_axis(out, axis, lo))
        blocks.append(out)
        if d - hi > 0:
            blocks.append(_zeros_like_axis(out, axis, d - hi))
        out = bind(concat_p, *blocks, axis=axis)
    return [out]


def _zeros_like_axis(like: Value, axis: int, size: int):
    shape = list(like.shape)
    shape[axis] = size
    return bind(broadcast_to_p, np.zeros((), like.dtype), shape=tuple(shape))


slice_p = register(Primitive("slice", _slice_rule, _slice_impl, _slice_vjp))


# --------------------------------------------------------------------------------------------
# take: gather along one axis by an integer index array; take_add: its adjoint (scatter-add).


def _take_rule(x, idx, axis):
    (shape, dtype), (ishape, idtype) = x, idx
    if not np.issubdtype(idtype, np.integer):
        raise ShapeError(f"indices must be integers, got {idtype}")
    if not 0 <= axis < len(shape):
        raise ShapeError(f"axis {axis} out of range for rank {len(shape)}")
    return [(tuple(shape[:axis]) + tuple(ishape) + tuple(shape[axis + 1 :]), dtype)]


def _take_impl(x, idx, axis):
    if idx.size and (idx.min() < -x.shape[axis] or idx.max() >= x.shape[axis]):
        raise IndexError(f"index out of range [{idx.min()}, {idx.max()}] for axis {axis} of size {x.shape[axis]}")
    return [np.take(x, idx, axis=axis)]


def _take_vjp(node, g):
    x, idx = node.inputs
    return [bind(take_add_p, g[0], idx, axis=node.attrs["axis"], size=x.shape[node.attrs["axis"]]), None]


take_p = register(Primitive("take", _take_rule, _take_impl, _take_vjp))


def _take_add_rule(g, idx, axis, size):
    (gshape, dtype), (ishape, _) = g, idx
    k = len(ishape)
    if tuple(gshape[axis : axis + k]) != tuple(ishape):
        raise ShapeError(f"cotangent shape {gshape} does not hold index shape {ishape} at axis {axis}")
    return [(tuple(gshape[:axis]) + (size,) + tuple(gshape[axis + k :]), dtype)]


def _take_add_impl(g, idx, axis, size):
    k = idx.ndim
    out_shape = g.shape[:axis] + (size,) + g.shape[axis + k :]
    out = np.zeros(out_shape, g.dtype)
    moved = np.moveaxis(out, axis, 0)  # a view: (size, pre..., post...)
    gm = np.moveaxis(g.reshape(g.shape[:axis] + (idx.size,) + g.shape[axis + k :]), axis, 0)  # (n, pre..., post...)
    np.add.at(moved, idx.reshape(-1), gm)
    return [out]


def _take_add_vjp(node, g):
    _, idx = node.inputs
    return [bind(take_p, g[0], idx, axis=node.attrs["axis"]), None]


take_add_p = register(Primitive("take_add", _take_add_rule, _take_add_impl, _take_add_vjp))
