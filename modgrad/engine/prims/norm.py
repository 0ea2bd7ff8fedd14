"""Layer normalisation over the last axis, forward and backward as one primitive each.

Written with the basic primitives, a layer norm is thirteen ops forward and more than that
backward. The CTM's U-Net synapse (depth 8) runs 22 of them per tick, so on the numpy
evaluator, where every op costs a few microseconds whatever its size, the composition dominated
a small brain's train step. As one op it lowers to Mojo kernels on the CPU and to MAX's
built-in layer norm elsewhere.

``activation="silu"`` applies SiLU to the normalised output inside the same op, as the
synapse's Linear-LN-SiLU blocks do, which saves an op each way per block. Its gradient then
also reads beta, to recompute the output that SiLU saw.
"""

from __future__ import annotations

import numpy as np

from modgrad.engine.core import Primitive, ShapeError, bind, is_float, register
from modgrad.engine.prims.elementwise import _sigmoid

ACTIVATIONS = ("none", "silu")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"layer_norm activation must be one of {ACTIVATIONS}, got {activation!r}")


def _layer_norm_rule(x, gamma, beta, eps: float, activation: str = "none"):
    _check_activation(activation)
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


def _layer_norm_impl(x, gamma, beta, eps: float, activation: str = "none"):
    x_hat, _ = _normalise(x, eps)
    y = x_hat * gamma + beta
    if activation == "silu":
        y = y * _sigmoid(y)
    return [y.astype(x.dtype, copy=False)]


def _layer_norm_vjp(node, g):
    x, gamma, beta = node.inputs
    eps, activation = node.attrs["eps"], node.attrs.get("activation", "none")
    if activation == "none":
        return bind(layer_norm_backward_p, x, gamma, g[0], eps=eps)
    return bind(layer_norm_backward_p, x, gamma, g[0], beta, eps=eps, activation=activation)


def _layer_norm_backward_rule(x, gamma, grad, *beta, eps: float, activation: str = "none"):
    if tuple(grad[0]) != tuple(x[0]) or grad[1] != x[1]:
        raise ShapeError(f"the output gradient must be {x[0]} {x[1]}, got {grad[0]} {grad[1]}")
    if len(beta) != (activation != "none"):
        raise ShapeError(f"layer_norm_backward takes beta exactly when it has an activation, got "
                         f"activation {activation!r} and {len(beta)} beta inputs")
    _layer_norm_rule(x, gamma, beta[0] if beta else gamma, eps, activation)
    return [x, gamma, gamma]


def _layer_norm_backward_impl(x, gamma, grad, *beta, eps: float, activation: str = "none"):
    """Return (d_x, d_gamma, d_beta) of y = act(x_hat * gamma + beta). beta comes only with an activation."""
    x_hat, inv_std = _normalise(x, eps)
    if activation == "silu":
        y = x_hat * gamma + beta[0]
        s = _sigmoid(y)
        grad = grad * s * (1.0 + y * (1.0 - s))
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
