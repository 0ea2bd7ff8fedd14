"""Lowerings of the fused primitives: a Mojo custom op, or the same math in MAX built-in ops.

``_segment_graph`` passes ``kernel=True`` to a lowering when the compiled function uses the
kernel for that primitive (see :func:`kernel_ops`) and creates the graph with the kernel
package loaded. The kernels take float32 only, so other dtypes always get the composition.
"""

from __future__ import annotations

import os

from max.dtype import DType
from max.graph import TensorValue, ops

from modgrad.graphs import LOWERINGS, kernels, lowering

# Fused primitives with a Mojo kernel, and whether the kernel is on by default. Measured with
# `python bench/kernel_ops.py --kernels fused` on a 2-core x86-64 CPU at the maze CTM shape
# (D 512, B 16, M 25, H 32, 32 sync pairs), fastest runs. nlm_glu took 197 us against 300 us
# for the MAX composition, its backward 1178 against 1864 us, and the sync update's backward
# 36 against 67 us. The sync update's forward tied (29 against 30 us, median 47 against
# 38 us), so it stays off. matvec (the decode products) took 1.2 ms against 2.0 ms for
# ops.matmul at B 1, K 896, N 9728 with the weights read from DRAM. The attention rows are medians
# with another job on the second core, at Qwen2.5-0.5B's heads. decode_attention (B 1, 1,024
# cached tokens) took 344 us against 1,032 us for the composition, which first copies the cache.
# causal_attention (B 1, 512 tokens) took 18.3 ms against 32.9 ms. single_query_attention
# (fastest runs, quiet machine) took 57 us against 349 us at the CTM benchmark's shape (B 16,
# 100 tokens, 8 heads of 16) and 60 against 234 us at the maze CTM's. Its backward took 166
# against 803 us and 105 against 471 us at the same two shapes. trace_push (fastest runs, quiet,
# the maze CTM's window of D 512, B 16, M 25) took 51 against 280 us, its backward 50 against
# 240 us, and its backward of a sum of two gradients 87 against 409 us. The layer norm kernels
# are lowered in graphs/norm.py. At 16 rows of 441 values, as in the CTM's synapse (fastest
# runs, quiet), the backward took 19 against 36 us and with SiLU 28 against 38 us. The forward
# tied with MAX's built-in layer norm there (12 against 12 us, with SiLU 15 against 17 us) and
# took 143 against 154 us at 512 rows of 896.
# NOTE: GPUs get the same defaults without a measurement.
KERNEL_DEFAULTS: dict[str, bool] = {
    "nlm_glu": True,
    "nlm_glu_backward": True,
    "sync_update": False,
    "sync_update_backward": True,
    "matvec": True,
    "single_query_attention": True,
    "single_query_attention_backward": True,
    "trace_push": True,
    "trace_push_backward": True,
    "layer_norm": True,
    "layer_norm_backward": True,
    "decode_attention": True,
    "causal_attention": True,
}

ENV_FLAG = "MODGRAD_KERNELS"


def kernel_ops(flag: bool | None = None) -> frozenset[str]:
    """Return the fused primitives that lower to Mojo kernels.

    flag: True or False switches every kernel on or off. None reads ``MODGRAD_KERNELS``
    ("1" or "0"), and when that is unset uses ``KERNEL_DEFAULTS``.
    """
    if flag is None:
        env = os.environ.get(ENV_FLAG, "")
        if env not in ("", "0", "1"):
            raise ValueError(f"{ENV_FLAG} must be 0 or 1, got {env!r}; unset it to use the defaults")
        if env:
            flag = env == "1"
    if flag is None:
        return frozenset(name for name, on in KERNEL_DEFAULTS.items() if on)
    if not isinstance(flag, bool):
        raise TypeError(f"kernels must be True, False or None, got {flag!r}")
    return frozenset(KERNEL_DEFAULTS) if flag else frozenset()


def _takes_kernel(*values: TensorValue) -> bool:
    return all(v.dtype == DType.float32 for v in values)


def _glu_halves(trace, w, b):
    """Return the value and gate halves of the pre-activations, each (D, B, H)."""
    pre = ops.matmul(trace, w) + ops.unsqueeze(b, 1)  # (D, B, 2H)
    hidden = int(w.shape[2]) // 2
    return pre[:, :, :hidden], pre[:, :, hidden:]


@lowering("nlm_glu")
def _nlm_glu(trace, w, b, device, kernel=False):
    if kernel and _takes_kernel(trace, w, b):
        return kernels.nlm_forward(trace, w, b, neuron_major=True)
    value, gate = _glu_halves(trace, w, b)
    return value * ops.sigmoid(gate)


@lowering("nlm_glu_backward")
def _nlm_glu_backward(trace, w, b, grad, device, kernel=False):
    if kernel and _takes_kernel(trace, w, b, grad):
        return list(kernels.nlm_backward(trace, w, b, grad, neuron_major=True))
    value, gate = _glu_halves(trace, w, b)
    gate = ops.sigmoid(gate)
    d_pre = ops.concat([grad * gate, grad * value * gate * (1.0 - gate)], axis=-1)  # (D, B, 2H)
    d_trace = ops.matmul(d_pre, ops.permute(w, [0, 2, 1]))  # (D, B, M)
    d_w = ops.matmul(ops.permute(trace, [0, 2, 1]), d_pre)  # (D, M, 2H)
    d_b = ops.squeeze(ops.sum(d_pre, axis=1), 1)  # (D, 2H)
    return [d_trace, d_w, d_b]


def _last_axis(x, start, stop):
    """x[..., start:stop]."""
    return x[(slice(None),) * (x.rank - 1) + (slice(start, stop),)]


@lowering("trace_push")
def _trace_push(trace, new, device, kernel=False):
    if kernel and _takes_kernel(trace, new):
        slots = trace.shape[-1]
        window = kernels.trace_push(ops.reshape(trace, [-1, slots]), ops.reshape(new, [-1]))
        return ops.reshape(window, trace.shape)
    return ops.concat([_last_axis(trace, 1, None), ops.unsqueeze(new, -1)], axis=-1)


@lowering("trace_push_backward")
def _trace_push_backward(*grads, device, kernel=False):
    shape = grads[0].shape
    if kernel and _takes_kernel(*grads):
        slots = shape[-1]
        d_trace, d_new = kernels.trace_push_backward(*(ops.reshape(g, [-1, slots]) for g in grads))
        return [ops.reshape(d_trace, shape), ops.reshape(d_new, shape[:-1])]
    grad = grads[0] if len(grads) == 1 else grads[0] + grads[1]
    zero = ops.broadcast_to(ops.constant(0, grad.dtype, grad.device), list(shape[:-1]) + [1])
    d_trace = ops.concat([zero, _last_axis(grad, None, -1)], axis=-1)
    return [d_trace, ops.squeeze(_last_axis(grad, -1, None), -1)]



def _pair_products(z, left, right):
    left, right = ops.cast(left, DType.int64), ops.cast(right, DType.int64)
    return ops.gather(z, left, axis=1), ops.gather(z, right, axis=1)  # each (B, S)


@lowering("sync_update")
def _sync_update(z, left, right, decay, alpha, beta, device, kernel=False):
    if kernel and _takes_kernel(z, decay, alpha, beta):
        left, right = ops.cast(left, DType.int32), ops.cast(right, DType.int32)
        return list(kernels.sync_update(z, left, right, decay, alpha, beta))
    z_left, z_right = _pair_products(z, left, right)
    alpha_new = decay * alpha + z_left * z_right
    beta_new = decay * beta + 1.0
    return [alpha_new, beta_new, alpha_new / ops.sqrt(beta_new)]


@lowering("sync_update_backward")
def _sync_update_backward(
    z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync, device, kernel=False
):
    if kernel and _takes_kernel(z, decay, alpha, beta, grad_alpha, grad_beta, grad_sync):
        left, right = ops.cast(left, DType.int32), ops.cast(right, DType.int32)
        grads = (grad_alpha, grad_beta, grad_sync)
        return list(kernels.sync_update_backward(z, left, right, decay, alpha, beta, *grads))
    z_left, z_right = _pair_products(z, left, right)
    alpha_new = decay * alpha + z_left * z_right
    beta_new = decay * beta + 1.0
    root = ops.sqrt(beta_new)
    total_alpha = grad_alpha + grad_sync / root
    total_beta = grad_beta - grad_sync * (alpha_new / root) / (2.0 * beta_new)
    d_decay = ops.squeeze(ops.sum(total_alpha * alpha + total_beta * beta, axis=0), 0)  # (S,)
    scatter = LOWERINGS["take_add"]  # the engine's adjoint of a gather, duplicates accumulate
    neurons = z.shape[1]
    d_z = scatter(total_alpha * z_right, left, device=device, axis=1, size=neurons)
    d_z = d_z + scatter(total_alpha * z_left, right, device=device, axis=1, size=neurons)
    return [d_z, d_decay, decay * total_alpha, decay * total_beta]


@lowering("matvec")
def _matvec(x, w, device, kernel=False):
    if not (kernel and _takes_kernel(x, w)):
        return ops.matmul(x, w)
    inner, columns = w.shape
    rows = ops.reshape(x, [-1, inner])  # (R, K)
    return ops.reshape(kernels.matvec(rows, w), [*x.shape[:-1], columns])  # (..., N)
