"""Layer norm lowerings. On the CPU they emit Mojo kernels. Elsewhere they emit MAX's built-in
layer norm and the hand-derived gradient in MAX ops. Both handle ``activation="silu"``."""

from __future__ import annotations

from max.dtype import DType
from max.graph import ops

from modgrad.graphs import kernels, lowering


def _takes_kernel(device, *values) -> bool:
    return device.is_cpu() and all(v.dtype == DType.float32 for v in values)


def _rows(x):
    return ops.reshape(x, [-1, x.shape[-1]])


@lowering("layer_norm")
def _layer_norm(x, gamma, beta, device, eps, activation="none", kernel=False):
    if kernel and _takes_kernel(device, x, gamma, beta):
        y = kernels.layer_norm(_rows(x), gamma, beta, eps, silu=activation == "silu")
        return ops.reshape(y, x.shape)
    y = ops.layer_norm(x, gamma, beta, epsilon=eps)
    return ops.silu(y) if activation == "silu" else y


def _mean_last(x):
    return ops.mean(x, axis=-1)  # keeps the axis with size 1


@lowering("layer_norm_backward")
def _layer_norm_backward(x, gamma, grad, *beta, device, eps, activation="none", kernel=False):
    if kernel and _takes_kernel(device, x, gamma, grad, *beta):
        d_x, d_gamma, d_beta = kernels.layer_norm_backward(_rows(x), gamma, _rows(grad), eps, *beta)
        return [ops.reshape(d_x, x.shape), d_gamma, d_beta]
    centred = x - _mean_last(x)
    inv_std = ops.rsqrt(_mean_last(centred * centred) + eps)  # (..., 1)
    x_hat = centred * inv_std
    if activation == "silu":
        y = x_hat * gamma + beta[0]
        s = ops.sigmoid(y)
        grad = grad * s * (1.0 + y * (1.0 - s))
    d_gamma = ops.sum(ops.reshape(grad * x_hat, [-1, x.shape[-1]]), axis=0)  # (1, D)
    d_beta = ops.sum(ops.reshape(grad, [-1, x.shape[-1]]), axis=0)
    d_hat = grad * gamma
    d_x = inv_std * (d_hat - _mean_last(d_hat) - x_hat * _mean_last(d_hat * x_hat))
    return [d_x, ops.squeeze(d_gamma, 0), ops.squeeze(d_beta, 0)]
