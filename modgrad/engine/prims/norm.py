"""Layer normalisation over the last axis, forward and backward as one primitive each.

Written with the basic primitives, a layer norm is thirteen ops forward and more than that
backward. The CTM's U-Net synapse runs seven of them per tick, so on the numpy evaluator, where
every op costs a few microseconds whatever its size, the composition dominated a small brain's
train step. As one op it also lowers to MAX's built-in layer norm.
"""

from __future__ import annotations

import numpy as np

from modgrad.engine.core import Primitive, ShapeError, bind, is_float, register


def _layer_norm_rule(x, gamma, beta, eps: float):
    (xs, xd), (gs, gd), (bs, bd) = x, gamma, beta
    if not is_float(xd) or gd != xd or bd != xd:
        raise ShapeError(f"expected one floating dtype, got x {xd}, gamma {gd} and beta {bd}")
    if not xs:
        raise ShapeError("layer_norm needs at least one axis to normalise")
    if tuple(gs) != (xs[-1],) or tuple(bs) != (xs[-1],):
        raise ShapeError(f"gamma {gs} and beta {bs} must both be ({xs[-1]},), the size of the last axis")
    return [(xs, xd)]


def _mean_last(x: np.ndarray) -> np.ndarray:
    # np.add.reduce skips np.mean's Python wrapper, which costs as much as the arithmetic on a
    # small region's rows. The division by the count is the one np.mean does.
    return np.add.reduce(x, axis=-1, keepdims=True) / x.shape[-1]


def _normalise(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (x_hat, 1 / std), with the biased variance of the last axis."""
    centred = x - _mean_last(x)
    inv_std = 1.0 / np.sqrt(_mean_last(centred * centred) + eps)  # (..., 1)
    return centred * inv_std, inv_std


def _layer_norm_impl(x, gamma, beta, eps: float):
    x_hat, _ = _normalise(x, eps)
    return [(x_hat * gamma + beta).astype(x.dtype, copy=False)]


def _layer_norm_vjp(node, g):
    x, gamma, _ = node.inputs
    return bind(layer_norm_backward_p, x, gamma, g[0], eps=node.attrs["eps"])


def _layer_norm_backward_rule(x, gamma, grad, eps: float):
    if tuple(grad[0]) != tuple(x[0]) or grad[1] != x[1]:
        raise ShapeError(f"the output gradient must be {x[0]} {x[1]}, got {grad[0]} {grad[1]}")
    _layer_norm_rule(x, gamma, gamma, eps)
    return [x, gamma, gamma]


def _layer_norm_backward_impl(x, gamma, grad, eps: float):
    """Return (d_x, d_gamma, d_beta) of y = x_hat * gamma + beta."""
    x_hat, inv_std = _normalise(x, eps)
    lead = tuple(range(x.ndim - 1))
    d_gamma = np.add.reduce(grad * x_hat, axis=lead)  # (D,)
    d_beta = np.add.reduce(grad, axis=lead)  # (D,)
    d_hat = grad * gamma  # (..., D)
    d_x = inv_std * (d_hat - _mean_last(d_hat) - x_hat * _mean_last(d_hat * x_hat))
    return [np.asarray(a).astype(x.dtype, copy=False) for a in (d_x, d_gamma, d_beta)]


layer_norm_p = register(Primitive("layer_norm", _layer_norm_rule, _layer_norm_impl, _layer_norm_vjp))
# NOTE: no VJP, so a second derivative through a layer norm raises NotImplementedError.
layer_norm_backward_p = register(
    Primitive("layer_norm_backward", _layer_norm_backward_rule, _layer_norm_backward_impl, multiple_results=True)
)
