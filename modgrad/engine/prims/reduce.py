"""Reductions: sum, max, argmax, and the element count of a (possibly symbolic) set of axes."""

from __future__ import annotations

import numpy as np

from modgrad.engine.core import Primitive, ShapeError, bind, normalize_axes, register


def _reduced_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _reduce_rule(x, axes, keepdims):
    shape, dtype = x
    if tuple(axes) != normalize_axes(axes, len(shape)):
        raise ShapeError(f"axes {axes} must be sorted, unique and non-negative")
    return [(_reduced_shape(shape, axes, keepdims), dtype)]


def _expand_back(g, node):
    """Broadcast a reduced cotangent back to the input's shape."""
    from modgrad.engine.prims.shape import broadcast_to_p, reshape_p

    x = node.inputs[0]
    axes, keepdims = node.attrs["axes"], node.attrs["keepdims"]
    if not keepdims:
        g = bind(reshape_p, g, shape=_reduced_shape(x.shape, axes, True))
    return bind(broadcast_to_p, g, shape=tuple(x.shape))


def _sum_vjp(node, g):
    return [_expand_back(g[0], node)]


reduce_sum_p = register(
    Primitive(
        "reduce_sum",
        _reduce_rule,
        lambda x, axes, keepdims: [np.asarray(np.sum(x, axis=tuple(axes), keepdims=keepdims), dtype=x.dtype)],
        _sum_vjp,
    )
)


def _max_vjp(node, g):
    from modgrad.engine.prims.elementwise import cast_p, equal_p

    x = node.inputs[0]
    out = node.outputs[0]
    out_full = _expand_back(out, node)
    # Ties share the gradient equally, as torch.amax does.
    mask = bind(cast_p, bind(equal_p, x, out_full), dtype=x.dtype)
    count = bind(reduce_sum_p, mask, axes=node.attrs["axes"], keepdims=node.attrs["keepdims"])
    return [mask * _expand_back(g[0] / count, node)]


reduce_max_p = register(
    Primitive(
        "reduce_max",
        _reduce_rule,
        lambda x, axes, keepdims: [np.asarray(np.max(x, axis=tuple(axes), keepdims=keepdims))],
        _max_vjp,
    )
)


def _argmax_rule(x, axis, keepdims):
    shape, _ = x
    return [(_reduced_shape(shape, (axis,), keepdims), np.dtype(np.int64))]


argmax_p = register(
    Primitive(
        "argmax",
        _argmax_rule,
        lambda x, axis, keepdims: [np.asarray(np.argmax(x, axis=axis, keepdims=keepdims), dtype=np.int64)],
        lambda n, g: [None],
    )
)


def _size_rule(x, axes, dtype):
    return [((), np.dtype(dtype))]


def _size_impl(x, axes, dtype):
    n = 1
    for a in axes:
        n *= x.shape[a]
    return [np.asarray(n, dtype=dtype)]


# The element count over ``axes`` as a scalar; lets mean work over symbolic sizes.
size_of_p = register(Primitive("size_of", _size_rule, _size_impl, lambda n, g: [None]))
