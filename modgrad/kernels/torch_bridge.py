"""The Mojo kernels called on torch tensors, through ``max.experimental.torch``.

Each op is a torch custom op (registered by MAX under the ``max`` namespace) backed by a MAX
graph that calls the kernel. The graph is built with symbolic dimensions, so the first call
per op and device compiles it (tens of seconds on a CPU, cached on disk by MAX afterwards) and
every later shape reuses it. Tensors must be on the CPU or on a CUDA device that MAX can use.
Float tensors are float32 (``matvec`` also takes a bfloat16 ``w``) and indices int32.
Non-contiguous inputs are copied.

    from modgrad.kernels import torch_bridge
    alpha, beta, sync = torch_bridge.sync_update(z, left, right, decay, alpha, beta)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from max.dtype import DType
from max.experimental.torch import CustomOpLibrary
# MaxOp is public in this module but not re-exported by the package (max 26.7).
from max.experimental.torch.torch import MaxOp, max_device_ref
from max.graph import TensorType, TensorValue, ops

from modgrad.kernels.adamw import adamw_hyper

try:  # installed wheel
    from modgrad.graphs import kernels as graph_kernels
except ImportError:  # source checkout, repository root on sys.path
    from modgrad.graphs import kernels as graph_kernels

F32, I32, I64, BF16 = DType.float32, DType.int32, DType.int64, DType.bfloat16


@dataclass(frozen=True)
class _OpSpec:
    """A kernel's graph function with the symbolic types of its inputs and outputs."""

    build: Callable[..., Sequence[TensorValue] | TensorValue]
    inputs: tuple[tuple[DType, tuple[str, ...]], ...]
    outputs: tuple[tuple[DType, tuple[str, ...]], ...]


_SPECS: dict[str, _OpSpec] = {
    "sync_update": _OpSpec(
        graph_kernels.sync_update,
        inputs=((F32, ("B", "D")), (I32, ("S",)), (I32, ("S",)), (F32, ("S",)),
                (F32, ("B", "S")), (F32, ("B", "S"))),
        outputs=((F32, ("B", "S")),) * 3,
    ),
    "sync_update_backward": _OpSpec(
        graph_kernels.sync_update_backward,
        inputs=((F32, ("B", "D")), (I32, ("S",)), (I32, ("S",)), (F32, ("S",)),
                *[(F32, ("B", "S"))] * 5),
        outputs=((F32, ("B", "D")), (F32, ("S",)), (F32, ("B", "S")), (F32, ("B", "S"))),
    ),
    "nlm_forward": _OpSpec(
        graph_kernels.nlm_forward,
        inputs=((F32, ("B", "D", "M")), (F32, ("D", "M", "O")), (F32, ("D", "O"))),
        outputs=((F32, ("B", "D", "H")),),
    ),
    "nlm_backward": _OpSpec(
        graph_kernels.nlm_backward,
        inputs=((F32, ("B", "D", "M")), (F32, ("D", "M", "O")), (F32, ("D", "O")),
                (F32, ("B", "D", "H"))),
        outputs=((F32, ("B", "D", "M")), (F32, ("D", "M", "O")), (F32, ("D", "O"))),
    ),
    "matvec": _OpSpec(
        graph_kernels.matvec,
        inputs=((F32, ("B", "K")), (F32, ("K", "N"))),
        outputs=((F32, ("B", "N")),),
    ),
    "matvec_bf16": _OpSpec(
        graph_kernels.matvec,
        inputs=((F32, ("B", "K")), (BF16, ("K", "N"))),
        outputs=((F32, ("B", "N")),),
    ),
    "adamw_fused": _OpSpec(
        graph_kernels.adamw_fused,
        inputs=(*[(F32, ("N",))] * 4, (F32, ("8",))),
        outputs=((F32, ("N",)),) * 3,
    ),
    "mha_single_query": _OpSpec(
        graph_kernels.mha_single_query,
        inputs=((F32, ("B", "H", "dh")), (F32, ("B", "n", "H", "dh")), (F32, ("B", "n", "H", "dh"))),
        outputs=((F32, ("B", "H", "dh")),),
    ),
    "decode_attention": _OpSpec(
        graph_kernels.decode_attention,
        inputs=((F32, ("B", "H", "dh")), (F32, ("B", "Hkv", "dh")), (F32, ("B", "Hkv", "dh")),
                (F32, ("L", "B", "Hkv", "dh")), (F32, ("L", "B", "Hkv", "dh"))),
        outputs=((F32, ("B", "H", "dh")),),
    ),
    "causal_attention": _OpSpec(
        graph_kernels.causal_attention,
        inputs=((F32, ("B", "T", "H", "dh")), (F32, ("B", "T", "Hkv", "dh")), (F32, ("B", "T", "Hkv", "dh")),
                (I64, ("T",))),
        outputs=((F32, ("B", "T", "H", "dh")),),
    ),
}


@functools.cache
def library() -> CustomOpLibrary:
    """Return the kernel package loaded as a ``CustomOpLibrary`` (built on first use)."""
    return CustomOpLibrary(graph_kernels.kernel_library_path())


def _tensor_types(specs, device) -> list[TensorType]:
    device_ref = max_device_ref(device)
    return [TensorType(dtype, [int(dim) if dim.isdigit() else dim for dim in shape], device_ref)
            for dtype, shape in specs]


@functools.cache
def _torch_op(name: str, device: torch.device):
    spec = _SPECS[name]
    output_types = _tensor_types(spec.outputs, device)

    def graph(*inputs: TensorValue) -> list[TensorValue]:
        results = spec.build(*inputs)
        results = [results] if isinstance(results, TensorValue) else list(results)
        # Output buffers carry plain symbolic dims; results may carry algebraic ones (O // 2).
        return [ops.rebind(result, out.shape) for result, out in zip(results, output_types)]

    # torch infers the op schema from the signature and rejects *args.
    graph.__signature__ = inspect.Signature(
        [inspect.Parameter(f"input{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD)
         for i in range(len(spec.inputs))]
    )

    op_name = f"modgrad_{name}_{device.type}{device.index or 0}"
    max_op = MaxOp(
        graph,
        op_name,
        library(),
        input_types=_tensor_types(spec.inputs, device),
        output_types=output_types,
    )
    return max_op.custom_op_def()


def _call(name: str, inputs: Sequence[torch.Tensor], output_shapes: Sequence[Sequence[int]]):
    device = inputs[0].device
    for index, tensor in enumerate(inputs):
        if tensor.device != device:
            raise ValueError(f"{name}: input {index} is on {tensor.device}, input 0 on {device}")
    outputs = [torch.empty(tuple(shape), dtype=torch.float32, device=device) for shape in output_shapes]
    _torch_op(name, device)(*outputs, *[tensor.contiguous() for tensor in inputs])
    return outputs


def sync_update(z, left, right, decay, alpha, beta):
    """Return ``(alpha', beta', sync)``, each (B, S); see ``modgrad.graphs.kernels.sync_update``."""
    shape = (z.shape[0], left.shape[0])
    return tuple(_call("sync_update", [z, left, right, decay, alpha, beta], [shape] * 3))


def sync_update_backward(z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync):
    """Return ``(d_z, d_decay, d_alpha, d_beta)`` of :func:`sync_update`."""
    inputs = [z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync]
    shapes = [z.shape, left.shape, alpha.shape, alpha.shape]
    return tuple(_call("sync_update_backward", inputs, shapes))


def nlm_forward(trace, weight, bias):
    """Return the per-neuron GLU output (B, D, H); see ``modgrad.graphs.kernels.nlm_forward``."""
    shape = (trace.shape[0], trace.shape[1], weight.shape[2] // 2)
    return _call("nlm_forward", [trace, weight, bias], [shape])[0]


def nlm_backward(trace, weight, bias, grad_output):
    """Return ``(d_trace, d_weight, d_bias)`` of :func:`nlm_forward`."""
    shapes = [trace.shape, weight.shape, bias.shape]
    return tuple(_call("nlm_backward", [trace, weight, bias, grad_output], shapes))


def matvec(x, w):
    """Return ``x @ w`` as float32 (B, N) for a float32 or bfloat16 ``w``."""
    name = "matvec_bf16" if w.dtype == torch.bfloat16 else "matvec"
    return _call(name, [x, w], [(x.shape[0], w.shape[1])])[0]


def adamw_fused(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step, clip_scale=1.0):
    """Return ``(param', m', v')`` after one AdamW step on flat float32 tensors."""
    hyper = adamw_hyper(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
        clip_scale=clip_scale,
    )
    hyper = torch.from_numpy(hyper).to(param.device)
    return tuple(_call("adamw_fused", [param, grad, m, v, hyper], [param.shape] * 3))


def mha_single_query(q, k, v):
    """Return ``softmax(q . k / sqrt(dh)) v`` (B, H, dh) for one query per batch row and head."""
    return _call("mha_single_query", [q, k, v], [q.shape])[0]


def decode_attention(q, k, v, past_k, past_v):
    """Return one token's grouped-query attention (B, H, dh) over the cache (L, B, H_kv, dh) and itself."""
    return _call("decode_attention", [q, k, v, past_k, past_v], [q.shape])[0]


def causal_attention(q, k, v, positions):
    """Return causal grouped-query attention (B, T, H, dh): query t attends to key j where positions[j] <= positions[t]."""
    return _call("causal_attention", [q, k, v, positions], [q.shape])[0]
