"""MAX-graph calls of modgrad's Mojo kernels (``mojo_kernels/``) as custom ops.

Each function takes and returns ``TensorValue``s inside an active ``Graph`` and emits one
``ops.custom`` node that runs on the device of its first input. The graph must load the kernel
package, which :func:`kernel_library_path` builds on first use::

    with Graph("g", input_types=..., custom_extensions=[kernel_library_path()]) as graph:
        alpha, beta, sync = sync_update(z, left, right, decay, alpha, beta)

Shapes may be symbolic: the kernels read every size at run time, so one compiled graph serves
every batch, length and width. The numpy oracles are in ``modgrad.kernels.reference``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from max.dtype import DType
from max.graph import Dim, Graph, StaticDim, TensorType, TensorValue, ops

from modgrad.kernels.build import build_kernels


@functools.cache
def kernel_library_path() -> Path:
    """Build the kernel package once per source version and return its ``.mojoc`` path."""
    return build_kernels().path


def _require_library(op_name: str) -> None:
    library = kernel_library_path().resolve()
    loaded = [Path(path).resolve() for path in Graph.current.kernel_libraries_paths]
    if library not in loaded:
        raise RuntimeError(
            f"{op_name}: the current graph does not load the modgrad kernel package; "
            "create it with Graph(..., custom_extensions=[kernel_library_path()])"
        )


def _check_rank(op_name: str, name: str, value: TensorValue, rank: int) -> None:
    if value.rank != rank:
        raise ValueError(
            f"{op_name}: {name} must have rank {rank}, got shape {list(value.shape)}"
        )


def _check_dtype(op_name: str, name: str, value: TensorValue, dtypes: tuple[DType, ...]) -> None:
    if value.dtype not in dtypes:
        allowed = " or ".join(dtype.name for dtype in dtypes)
        raise TypeError(f"{op_name}: {name} must be {allowed}, got {value.dtype.name}")


def _f32(value: TensorValue, shape: list[Dim | int]) -> TensorType:
    return TensorType(DType.float32, shape, value.device)


def _custom(op_name: str, inputs: list[TensorValue], out_types: list[TensorType]) -> list[TensorValue]:
    _require_library(op_name)
    results = ops.custom(op_name, inputs[0].device, inputs, out_types)
    return [result.tensor for result in results]


# --------------------------------------------------------------------------------------------
# Synchronisation update


def sync_update(
    z: TensorValue,  # (B, D)
    left: TensorValue,  # (S,) int32
    right: TensorValue,  # (S,) int32
    decay: TensorValue,  # (S,)
    alpha: TensorValue,  # (B, S)
    beta: TensorValue,  # (B, S)
) -> tuple[TensorValue, TensorValue, TensorValue]:
    """Update the pairwise sync accumulators and return ``(alpha', beta', sync)``, each (B, S).

    ``alpha' = decay * alpha + z[:, left] * z[:, right]``, ``beta' = decay * beta + 1`` and
    ``sync = alpha' / sqrt(beta')``.
    """
    op_name = "sync_update"
    _check_pair_inputs(op_name, z, left, right, decay, alpha, beta)
    batch, pairs = z.shape[0], left.shape[0]
    out = _f32(z, [batch, pairs])
    alpha_new, beta_new, sync = _custom(
        op_name, [z, left, right, decay, alpha, beta], [out, out, out]
    )
    return alpha_new, beta_new, sync


def sync_update_backward(
    z: TensorValue,  # (B, D)
    left: TensorValue,  # (S,) int32
    right: TensorValue,  # (S,) int32
    decay: TensorValue,  # (S,)
    alpha: TensorValue,  # (B, S)
    beta: TensorValue,  # (B, S)
    grad_alpha: TensorValue,  # (B, S) gradient on alpha'
    grad_beta: TensorValue,  # (B, S) gradient on beta'
    grad_sync: TensorValue,  # (B, S) gradient on sync
) -> tuple[TensorValue, TensorValue, TensorValue, TensorValue]:
    """Return the gradients ``(d_z, d_decay, d_alpha, d_beta)`` of :func:`sync_update`.

    The integer pair indices get no gradient.
    """
    op_name = "sync_update_backward"
    _check_pair_inputs(op_name, z, left, right, decay, alpha, beta)
    for name, grad in (("grad_alpha", grad_alpha), ("grad_beta", grad_beta), ("grad_sync", grad_sync)):
        _check_rank(op_name, name, grad, 2)
        _check_dtype(op_name, name, grad, (DType.float32,))
    batch, neurons, pairs = z.shape[0], z.shape[1], left.shape[0]
    out_types = [
        _f32(z, [batch, neurons]),
        _f32(z, [pairs]),
        _f32(z, [batch, pairs]),
        _f32(z, [batch, pairs]),
    ]
    d_z, d_decay, d_alpha, d_beta = _custom(
        op_name,
        [z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync],
        out_types,
    )
    return d_z, d_decay, d_alpha, d_beta


def _check_pair_inputs(
    op_name: str,
    z: TensorValue,
    left: TensorValue,
    right: TensorValue,
    decay: TensorValue,
    alpha: TensorValue,
    beta: TensorValue,
) -> None:
    for name, value, rank in (
        ("z", z, 2), ("left", left, 1), ("right", right, 1),
        ("decay", decay, 1), ("alpha", alpha, 2), ("beta", beta, 2),
    ):
        _check_rank(op_name, name, value, rank)
    for name, value in (("z", z), ("decay", decay), ("alpha", alpha), ("beta", beta)):
        _check_dtype(op_name, name, value, (DType.float32,))
    for name, value in (("left", left), ("right", right)):
        _check_dtype(op_name, name, value, (DType.int32,))


# --------------------------------------------------------------------------------------------
# Neuron-level models


def nlm_forward(
    trace: TensorValue,  # (B, D, M), or (D, B, M) when neuron_major
    weight: TensorValue,  # (D, M, 2H)
    bias: TensorValue,  # (D, 2H)
    neuron_major: bool = False,
) -> TensorValue:
    """Apply each neuron's linear map to its trace window and a GLU; return (B, D, H).

    ``pre = einsum("bdm,dmo->bdo", trace, weight) + bias``, then
    ``pre[..., :H] * sigmoid(pre[..., H:])``. With ``neuron_major`` the trace is (D, B, M)
    and the result (D, B, H).
    """
    op_name = "nlm_forward_neuron_major" if neuron_major else "nlm_forward"
    _check_nlm_inputs(op_name, trace, weight, bias)
    rows = [trace.shape[0], trace.shape[1]]
    (output,) = _custom(op_name, [trace, weight, bias], [_f32(trace, rows + [weight.shape[2] // 2])])
    return output


def nlm_backward(
    trace: TensorValue,  # (B, D, M), or (D, B, M) when neuron_major
    weight: TensorValue,  # (D, M, 2H)
    bias: TensorValue,  # (D, 2H)
    grad_output: TensorValue,  # (B, D, H), or (D, B, H) when neuron_major
    neuron_major: bool = False,
) -> tuple[TensorValue, TensorValue, TensorValue]:
    """Return the gradients ``(d_trace, d_weight, d_bias)`` of :func:`nlm_forward`."""
    op_name = "nlm_backward_neuron_major" if neuron_major else "nlm_backward"
    _check_nlm_inputs(op_name, trace, weight, bias)
    _check_rank(op_name, "grad_output", grad_output, 3)
    _check_dtype(op_name, "grad_output", grad_output, (DType.float32,))
    rows = [trace.shape[0], trace.shape[1]]
    neurons, memory, outputs = weight.shape
    d_trace, d_weight, d_bias, _ = _custom(
        op_name,
        [trace, weight, bias, grad_output],
        [
            _f32(trace, rows + [memory]),
            _f32(trace, [neurons, memory, outputs]),
            _f32(trace, [neurons, outputs]),
            _f32(trace, rows + [outputs]),  # d_pre, scratch for the kernel
        ],
    )
    return d_trace, d_weight, d_bias


def _check_nlm_inputs(op_name: str, trace: TensorValue, weight: TensorValue, bias: TensorValue) -> None:
    for name, value, rank in (("trace", trace, 3), ("weight", weight, 3), ("bias", bias, 2)):
        _check_rank(op_name, name, value, rank)
        _check_dtype(op_name, name, value, (DType.float32,))
    outputs = weight.shape[2]
    if isinstance(outputs, StaticDim) and int(outputs) % 2 != 0:
        raise ValueError(
            f"{op_name}: weight has {int(outputs)} outputs per neuron; the GLU needs an even number"
        )


# --------------------------------------------------------------------------------------------
# Trace window


def trace_push(trace: TensorValue, new: TensorValue) -> TensorValue:
    """Return the window (R, M) with each row's oldest slot dropped and ``new`` (R,) appended."""
    op_name = "trace_push"
    _check_rank(op_name, "trace", trace, 2)
    _check_rank(op_name, "new", new, 1)
    for name, value in (("trace", trace), ("new", new)):
        _check_dtype(op_name, name, value, (DType.float32,))
    (window,) = _custom(op_name, [trace, new], [_f32(trace, list(trace.shape))])
    return window


def trace_push_backward(grad: TensorValue, other: TensorValue | None = None) -> tuple[TensorValue, TensorValue]:
    """Return ``(d_trace (R, M), d_new (R,))`` of :func:`trace_push` for the gradient ``grad``
    (R, M) on its result, plus ``other`` (R, M) when given. The kernel adds the two as it reads them."""
    grads = [grad] if other is None else [grad, other]
    op_name = "trace_push_backward" if other is None else "trace_push_backward_sum"
    for name, value in zip(("grad", "other"), grads):
        _check_rank(op_name, name, value, 2)
        _check_dtype(op_name, name, value, (DType.float32,))
    rows = grad.shape[0]
    d_trace, d_new = _custom(op_name, grads, [_f32(grad, list(grad.shape)), _f32(grad, [rows])])
    return d_trace, d_new


# --------------------------------------------------------------------------------------------
# Layer norm


def layer_norm(
    x: TensorValue,  # (R, D) float32
    gamma: TensorValue,  # (D,)
    beta: TensorValue,  # (D,)
    eps: float,
    silu: bool = False,
) -> TensorValue:
    """Return the layer norm of each row of ``x`` (biased variance) times ``gamma`` plus ``beta``,
    passed through SiLU when ``silu`` is True. CPU only."""
    op_name = "layer_norm_silu" if silu else "layer_norm"
    eps_value = _norm_eps(op_name, eps, x=(x, 2), gamma=(gamma, 1), beta=(beta, 1))
    (y,) = _custom(op_name, [x, gamma, beta, eps_value], [_f32(x, list(x.shape))])
    return y


def layer_norm_backward(
    x: TensorValue,  # (R, D) float32
    gamma: TensorValue,  # (D,)
    grad: TensorValue,  # (R, D), the gradient on the layer norm's output
    eps: float,
    beta: TensorValue | None = None,  # (D,), given for the gradient of layer_norm(..., silu=True)
) -> tuple[TensorValue, TensorValue, TensorValue]:
    """Return ``(d_x (R, D), d_gamma (D,), d_beta (D,))`` of :func:`layer_norm`, of its SiLU
    variant when ``beta`` is given. CPU only."""
    op_name = "layer_norm_backward" if beta is None else "layer_norm_silu_backward"
    inputs = dict(x=(x, 2), gamma=(gamma, 1), grad=(grad, 2))
    if beta is not None:
        inputs["beta"] = (beta, 1)
    eps_value = _norm_eps(op_name, eps, **inputs)
    size = x.shape[1]
    args = [x, gamma, grad] if beta is None else [x, gamma, beta, grad]
    d_x, d_gamma, d_beta = _custom(
        op_name, args + [eps_value], [_f32(x, list(x.shape)), _f32(x, [size]), _f32(x, [size])]
    )
    return d_x, d_gamma, d_beta


def _norm_eps(op_name: str, eps: float, **values: tuple[TensorValue, int]) -> TensorValue:
    """Check the kernel's inputs (name: (value, rank)) and return eps as a (1,) constant."""
    for name, (value, rank) in values.items():
        _check_rank(op_name, name, value, rank)
        _check_dtype(op_name, name, value, (DType.float32,))
    x = values["x"][0]
    if not x.device.is_cpu():
        raise ValueError(f"{op_name}: the kernel runs on the CPU only, got a value on {x.device}. "
                         "Lower ops.layer_norm without the kernel there")
    return ops.constant(np.array([eps], np.float32), DType.float32, x.device)


# --------------------------------------------------------------------------------------------
# Small-batch matmul

# K ranges of the small-batch matmul: enough that both cores of a small CPU get work when N is
# narrow (K = 896 gives 2), few enough that summing the partial results stays cheap.
MATVEC_ROWS_PER_SLICE = 384
MATVEC_MAX_SLICES = 8


def matvec(
    x: TensorValue,  # (B, K) float32
    w: TensorValue,  # (K, N) float32 or bfloat16
    slices: int | None = None,
) -> TensorValue:
    """Return ``x @ w`` as float32 (B, N), accumulating in float32 for either weight dtype.

    Tuned for small B (decode); for large B, ``ops.matmul`` is the better kernel. The kernel
    splits K into ``slices`` ranges, each summed by its own work items, and the graph adds the
    partial results; None picks one slice per ``MATVEC_ROWS_PER_SLICE`` rows of ``w`` (1 to
    ``MATVEC_MAX_SLICES``), or 1 when K is symbolic.
    """
    op_name = "matvec"
    _check_rank(op_name, "x", x, 2)
    _check_rank(op_name, "w", w, 2)
    _check_dtype(op_name, "x", x, (DType.float32,))
    _check_dtype(op_name, "w", w, (DType.float32, DType.bfloat16))
    if slices is None:
        inner = w.shape[0]
        slices = 1
        if isinstance(inner, StaticDim):
            slices = min(MATVEC_MAX_SLICES, max(1, int(inner) // MATVEC_ROWS_PER_SLICE))
    if slices < 1:
        raise ValueError(f"{op_name}: slices must be >= 1, got {slices}; pass None for the default split")
    (y,) = _custom(op_name, [x, w], [_f32(x, [slices, x.shape[0], w.shape[1]])])  # (S, B, N)
    if slices == 1:
        return ops.squeeze(y, 0)
    return ops.sum(y, axis=0).reshape([x.shape[0], w.shape[1]])


# --------------------------------------------------------------------------------------------
# Optimizer

def adamw_fused(
    param: TensorValue,  # (N,)
    grad: TensorValue,  # (N,)
    m: TensorValue,  # (N,) first moment
    v: TensorValue,  # (N,) second moment
    hyper: TensorValue,  # (8,) float32 from modgrad.kernels.adamw_hyper
) -> tuple[TensorValue, TensorValue, TensorValue]:
    """Take one AdamW step on flat float32 buffers; return ``(param', m', v')``.

    The arithmetic follows ``torch.optim.AdamW`` (decoupled weight decay, bias correction,
    ``eps`` added after the square root), with ``grad`` first multiplied by the clip scale.
    ``hyper`` is a graph input computed on the host for each step, so one compiled graph
    serves every step and learning-rate schedule.
    """
    op_name = "adamw_fused"
    for name, value in (("param", param), ("grad", grad), ("m", m), ("v", v), ("hyper", hyper)):
        _check_rank(op_name, name, value, 1)
        _check_dtype(op_name, name, value, (DType.float32,))
    out = _f32(param, [param.shape[0]])
    param_new, m_new, v_new = _custom(op_name, [param, grad, m, v, hyper], [out, out, out])
    return param_new, m_new, v_new


# --------------------------------------------------------------------------------------------
# Attention


def mha_single_query(
    q: TensorValue,  # (B, H, dh)
    k: TensorValue,  # (B, n, H, dh)
    v: TensorValue,  # (B, n, H, dh)
) -> TensorValue:
    """Return softmax(q . k / sqrt(dh)) v for one query per batch row and head, (B, H, dh)."""
    op_name = "mha_single_query"
    _check_rank(op_name, "q", q, 3)
    _check_rank(op_name, "k", k, 4)
    _check_rank(op_name, "v", v, 4)
    for name, value in (("q", q), ("k", k), ("v", v)):
        _check_dtype(op_name, name, value, (DType.float32,))
    (output,) = _custom(op_name, [q, k, v], [_f32(q, list(q.shape))])
    return output


def mha_single_query_backward(
    q: TensorValue,  # (B, H, dh)
    k: TensorValue,  # (B, n, H, dh)
    v: TensorValue,  # (B, n, H, dh)
    grad: TensorValue,  # (B, H, dh), the gradient of mha_single_query's output
) -> tuple[TensorValue, TensorValue, TensorValue]:
    """Return the gradients ``(d_q, d_k, d_v)`` of :func:`mha_single_query`."""
    op_name = "mha_single_query_backward"
    for name, value, rank in (("q", q, 3), ("k", k, 4), ("v", v, 4), ("grad", grad, 3)):
        _check_rank(op_name, name, value, rank)
        _check_dtype(op_name, name, value, (DType.float32,))
    d_q, d_k, d_v = _custom(
        op_name, [q, k, v, grad], [_f32(q, list(q.shape)), _f32(q, list(k.shape)), _f32(q, list(k.shape))]
    )
    return d_q, d_k, d_v


def decode_attention(
    q: TensorValue,  # (B, H, dh)
    k: TensorValue,  # (B, H_kv, dh), the new token
    v: TensorValue,  # (B, H_kv, dh)
    past_k: TensorValue,  # (L, B, H_kv, dh), the cache
    past_v: TensorValue,  # (L, B, H_kv, dh)
) -> TensorValue:
    """Return one token's grouped-query attention over the cache and itself, (B, H, dh)."""
    op_name = "decode_attention"
    for name, value, rank in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("past_k", past_k, 4), ("past_v", past_v, 4)):
        _check_rank(op_name, name, value, rank)
        _check_dtype(op_name, name, value, (DType.float32,))
    (output,) = _custom(op_name, [q, k, v, past_k, past_v], [_f32(q, list(q.shape))])
    return output


def causal_attention(
    q: TensorValue,  # (B, T, H, dh)
    k: TensorValue,  # (B, T, H_kv, dh)
    v: TensorValue,  # (B, T, H_kv, dh)
    positions: TensorValue,  # (T,) int64
) -> TensorValue:
    """Return causal grouped-query attention (B, T, H, dh): query t attends to key j where positions[j] <= positions[t]."""
    op_name = "causal_attention"
    for name, value in (("q", q), ("k", k), ("v", v)):
        _check_rank(op_name, name, value, 4)
        _check_dtype(op_name, name, value, (DType.float32,))
    _check_rank(op_name, "positions", positions, 1)
    positions = ops.cast(positions, DType.int64)
    (output,) = _custom(op_name, [q, k, v, positions], [_f32(q, list(q.shape))])
    return output
