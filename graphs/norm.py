"""Layer norm lowerings: MAX's built-in op forward, the hand-derived gradient as MAX ops."""

from __future__ import annotations

from max.graph import ops

from modgrad.graphs import lowering


@lowering("layer_norm")
def _layer_norm(x, gamma, beta, device, eps):
    return ops.layer_norm(x, gamma, beta, epsilon=eps)


def _mean_last(x):
    return ops.mean(x, axis=-1)  # keeps the axis with size 1


@lowering("layer_norm_backward")
def _layer_norm_backward(x, gamma, grad, device, eps):
    centred = x - _mean_last(x)
    inv_std = ops.rsqrt(_mean_last(centred * centred) + eps)  # (..., 1)
    x_hat = centred * inv_std
    d_gamma = ops.sum(ops.reshape(grad * x_hat, [-1, x.shape[-1]]), axis=0)  # (1, D)
    d_beta = ops.sum(ops.reshape(grad, [-1, x.shape[-1]]), axis=0)
    d_hat = grad * gamma
    d_x = inv_std * (d_hat - _mean_last(d_hat) - x_hat * _mean_last(d_hat * x_hat))
    return [d_x, ops.squeeze(d_gamma, 0), ops.squeeze(d_beta, 0)]
