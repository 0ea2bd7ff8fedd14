"""Batched matrix multiplication with numpy's broadcasting of the leading (batch) axes."""

from __future__ import annotations

import numpy as np

from modgrad.engine.core import Primitive, ShapeError, bind, broadcast_shapes, register


def _matmul_rule(a, b):
    (ash, ad), (bsh, bd) = a, b
    if ad != bd:
        raise ShapeError(f"dtypes differ: {ad} and {bd}")
    if len(ash) < 2 or len(bsh) < 2:
        raise ShapeError("both operands need rank >= 2 (ops.matmul reshapes vectors)")
    if ash[-1] != bsh[-2]:
        raise ShapeError(f"contraction sizes differ: {ash[-1]} and {bsh[-2]}")
    batch = broadcast_shapes(ash[:-2], bsh[:-2])
    return [(batch + (ash[-2], bsh[-1]), ad)]


def _swap_last(x):
    from modgrad.engine.prims.shape import transpose_p

    perm = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return bind(transpose_p, x, perm=perm)


def _matmul_vjp(node, g):
    from modgrad.engine.prims.elementwise import unbroadcast

    a, b = node.inputs
    ga = unbroadcast(bind(matmul_p, g[0], _swap_last(b)), a.shape)
    gb = unbroadcast(bind(matmul_p, _swap_last(a), g[0]), b.shape)
    return [ga, gb]


matmul_p = register(Primitive("matmul", _matmul_rule, lambda a, b: [np.matmul(a, b)], _matmul_vjp))
