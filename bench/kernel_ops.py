"""Benchmark modgrad's Mojo kernels against MAX built-ins, numpy and torch.

Prints one JSON line per measurement, starting with the machine:
- the kernel package's cold build time (``mojo precompile`` in a fresh process with an empty
  cache) and warm one (a second process that finds the build cached),
- the copy bandwidth (numpy copy of a 256 MB array, read plus write, one thread), the read
  bandwidth (torch sum of 256 MB, all threads) and a float32 matmul rate (numpy, 2048^3).

Then one line per kernel and shape with ``time_us`` for ``mojo`` (our custom op in a MAX
graph), ``max_ops`` (the same math written with ``max.graph.ops``), ``numpy`` and ``torch``
(CPU, eager): medians, and in ``min_time_us`` the fastest run. The ``fused`` family times
the engine's fused ops (``ops.nlm_glu``, ``ops.sync_update`` and their gradients) as
``modgrad.compile`` lowers them, with the kernel on (``mojo``) and off (``max_ops``). The
``trace`` family times ``ops.trace_push`` and its gradient the same way, and the ``norm`` family
the layer norm, with and without SiLU, and its gradient. The achieved GB/s counts
compulsory bytes: every input read once, every output written once. GB/s, GFLOP/s, the
fraction of the copy bandwidth and the machine figures all come from the fastest runs,
because on a machine shared with other work the fastest run is the better estimate.

    python bench/kernel_ops.py                      # all kernels on the CPU
    python bench/kernel_ops.py --kernels sync_update matvec --out results.jsonl
    python bench/kernel_ops.py --device gpu --quick # MAX graphs on the first accelerator

Each kernel compiles two MAX graphs (ours and the composition) with symbolic dimensions. On a
cold MAX cache that costs 15-60 s per graph on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from max.driver import CPU, Accelerator, Buffer  # noqa: E402
from max.dtype import DType  # noqa: E402
from max.engine import InferenceSession  # noqa: E402
from max.graph import DeviceRef, Graph, TensorType, TensorValue, ops  # noqa: E402

from common import matmul_gflop_s  # noqa: E402
from graphs import kernels  # noqa: E402
from modgrad.engine.prims import fused, norm  # noqa: E402
from modgrad.graphs import lower  # noqa: E402
from modgrad.kernels import adamw_hyper, reference  # noqa: E402

try:
    import torch
except ImportError:  # torch is optional; its column is left out
    torch = None

MIN_SECONDS = 0.3  # time spent per measurement, after warm-up
MAX_REPEATS = 2000


def emit(record: dict, out_file) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out_file is not None:
        out_file.write(line + "\n")
        out_file.flush()


def measure(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Return the median and the minimum wall time of ``fn`` over repeats that fill MIN_SECONDS.

    The minimum is the better estimate on a machine shared with other work.
    """
    for _ in range(3):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < MAX_REPEATS and (time.perf_counter() - start < MIN_SECONDS or len(times) < 5):
        begin = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), min(times)


def fastest_seconds(fn: Callable[[], object]) -> float:
    return measure(fn)[1]


# --------------------------------------------------------------------------------------------
# Machine


def build_times() -> dict:
    """Time a cold kernel build (fresh process and cache) and a warm one (second process)."""
    code = (
        "import json, sys, time; from pathlib import Path; t = time.perf_counter(); "
        "from modgrad.kernels.build import build_kernels; "
        "b = build_kernels(root=Path(sys.argv[1])); "
        "print(json.dumps({'seconds': b.seconds, 'cached': b.cached, "
        "'process_seconds': time.perf_counter() - t}))"
    )
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for label in ("cold", "warm"):
            begin = time.perf_counter()
            output = subprocess.run(
                [sys.executable, "-c", code, root], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
            record = json.loads(output.strip().splitlines()[-1])
            record["wall_seconds"] = time.perf_counter() - begin
            results[label] = record
    return results


def copy_bandwidth_gb_s() -> float:
    source = np.ones(256 * 2**20 // 4, dtype=np.float32)
    target = np.empty_like(source)
    seconds = fastest_seconds(lambda: np.copyto(target, source))
    return 2 * source.nbytes / seconds / 1e9


def read_gb_s() -> float | None:
    """Return the rate at which torch sums a 256 MB array with all its threads, or None.

    numpy's copy runs on one thread, so kernels that read with every core can beat it.
    """
    if torch is None:
        return None
    source = torch.ones(256 * 2**20 // 4)
    seconds = fastest_seconds(lambda: source.sum())
    return source.numel() * 4 / seconds / 1e9


# --------------------------------------------------------------------------------------------
# Kernels: inputs, symbolic graph types, the MAX composition, numpy and torch versions


@dataclass
class Case:
    """One benchmark: a kernel at one shape with every implementation of it."""

    kernel: str
    shape: dict
    inputs: list[np.ndarray]
    input_types: list[tuple[DType, list[str]]]
    ours: Callable[..., list[TensorValue]]
    composition: Callable[..., list[TensorValue]]
    numpy_fn: Callable[..., object]
    torch_fn: Callable[..., object] | None
    bytes: int
    flops: int


def _f32(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _nbytes(*arrays) -> int:
    return sum(array.nbytes for array in arrays)


def _sync_arrays(rng, batch: int, neurons: int, pairs: int, index_dtype) -> tuple[list, list, list]:
    """Return the sync update's inputs [z, left, right, decay, alpha, beta], three output gradients
    and the graph input types of the six inputs."""
    z = _f32(rng, batch, neurons)
    left = rng.integers(0, neurons, pairs).astype(index_dtype)
    right = rng.integers(0, neurons, pairs).astype(index_dtype)
    decay = rng.uniform(0, 1, pairs).astype(np.float32)
    alpha = _f32(rng, batch, pairs)
    beta = rng.uniform(0, 4, (batch, pairs)).astype(np.float32)
    grads = [_f32(rng, batch, pairs) for _ in range(3)]
    index_type = DType.int32 if index_dtype == np.int32 else DType.int64
    types = [(DType.float32, ["B", "D"]), (index_type, ["S"]), (index_type, ["S"]),
             (DType.float32, ["S"]), (DType.float32, ["B", "S"]), (DType.float32, ["B", "S"])]
    return [z, left, right, decay, alpha, beta], grads, types


def sync_cases(rng) -> list[Case]:
    cases = []
    for batch, neurons, pairs in [(1, 512, 4096), (64, 512, 4096)]:
        forward_inputs, grads, types = _sync_arrays(rng, batch, neurons, pairs, np.int32)
        z, _, _, decay, alpha, _ = forward_inputs
        shape = dict(B=batch, D=neurons, S=pairs)
        cases.append(Case(
            "sync_update", shape, forward_inputs, types,
            ours=lambda *v: list(kernels.sync_update(*v)),
            composition=lambda *v: list(_sync_composition(*v)),
            numpy_fn=reference.sync_update,
            torch_fn=_sync_torch,
            bytes=_nbytes(*forward_inputs) + 3 * alpha.nbytes,
            flops=5 * batch * pairs,
        ))
        backward_inputs = forward_inputs + grads
        cases.append(Case(
            "sync_update_backward", shape, backward_inputs, types + [(DType.float32, ["B", "S"])] * 3,
            ours=lambda *v: list(kernels.sync_update_backward(*v)),
            composition=lambda *v: list(_sync_backward_composition(*v)),
            numpy_fn=reference.sync_update_backward,
            torch_fn=_sync_backward_torch,
            bytes=_nbytes(*backward_inputs) + z.nbytes + decay.nbytes + 2 * alpha.nbytes,
            flops=20 * batch * pairs,
        ))
    return cases


def _sync_composition(z, left, right, decay, alpha, beta):
    product = ops.gather(z, left, axis=1) * ops.gather(z, right, axis=1)
    alpha_new = decay * alpha + product
    beta_new = decay * beta + 1.0
    return alpha_new, beta_new, alpha_new / ops.sqrt(beta_new)


def _sync_backward_composition(z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync):
    z_left, z_right = ops.gather(z, left, axis=1), ops.gather(z, right, axis=1)
    alpha_new = decay * alpha + z_left * z_right
    beta_new = decay * beta + 1.0
    root = ops.sqrt(beta_new)
    total_alpha = grad_alpha + grad_sync / root
    total_beta = grad_beta - grad_sync * (alpha_new / root) / (2.0 * beta_new)
    d_decay = ops.squeeze(ops.sum(total_alpha * alpha + total_beta * beta, axis=0), 0)
    shape = alpha.shape
    left_index = ops.broadcast_to(ops.unsqueeze(left, 0), shape).cast(DType.int64)
    right_index = ops.broadcast_to(ops.unsqueeze(right, 0), shape).cast(DType.int64)
    d_z = ops.scatter_add(z * 0.0, total_alpha * z_right, left_index, axis=1)
    d_z = ops.scatter_add(d_z, total_alpha * z_left, right_index, axis=1)
    return d_z, d_decay, decay * total_alpha, decay * total_beta


def _sync_torch(z, left, right, decay, alpha, beta):
    left, right = left.long(), right.long()
    alpha_new = decay * alpha + z[:, left] * z[:, right]
    beta_new = decay * beta + 1
    return alpha_new, beta_new, alpha_new / beta_new.sqrt()


def _sync_backward_torch(z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync):
    left, right = left.long(), right.long()
    z_left, z_right = z[:, left], z[:, right]
    alpha_new = decay * alpha + z_left * z_right
    beta_new = decay * beta + 1
    root = beta_new.sqrt()
    total_alpha = grad_alpha + grad_sync / root
    total_beta = grad_beta - grad_sync * (alpha_new / root) / (2 * beta_new)
    d_z = torch.zeros_like(z)
    d_z.index_add_(1, left, total_alpha * z_right)
    d_z.index_add_(1, right, total_alpha * z_left)
    d_decay = (total_alpha * alpha + total_beta * beta).sum(0)
    return d_z, d_decay, decay * total_alpha, decay * total_beta


def nlm_cases(rng) -> list[Case]:
    cases = []
    for batch, neurons, memory, hidden in [(1, 512, 25, 32), (64, 512, 25, 32)]:
        trace = _f32(rng, batch, neurons, memory)
        weight = _f32(rng, neurons, memory, 2 * hidden) / np.float32(np.sqrt(memory))
        bias = _f32(rng, neurons, 2 * hidden)
        grad_output = _f32(rng, batch, neurons, hidden)
        shape = dict(B=batch, D=neurons, M=memory, H=hidden)
        types = [(DType.float32, ["B", "D", "M"]), (DType.float32, ["D", "M", "O"]),
                 (DType.float32, ["D", "O"])]
        macs = batch * neurons * memory * 2 * hidden
        cases.append(Case(
            "nlm_forward", shape, [trace, weight, bias], types,
            ours=lambda *v: [kernels.nlm_forward(*v)],
            composition=lambda *v: [_nlm_composition(*v)],
            numpy_fn=reference.nlm_forward,
            torch_fn=_nlm_torch,
            bytes=_nbytes(trace, weight, bias) + grad_output.nbytes,
            flops=2 * macs + 4 * batch * neurons * hidden,
        ))
        cases.append(Case(
            "nlm_backward", shape, [trace, weight, bias, grad_output],
            types + [(DType.float32, ["B", "D", "H"])],
            ours=lambda *v: list(kernels.nlm_backward(*v)),
            composition=lambda *v: list(_nlm_backward_composition(*v)),
            numpy_fn=reference.nlm_backward,
            torch_fn=_nlm_backward_torch,
            bytes=2 * _nbytes(trace, weight, bias) + grad_output.nbytes,
            flops=6 * macs,
        ))
    return cases


def _nlm_pre(trace, weight, bias):
    """Return the value and gate halves of the pre-activations, each (B, D, H)."""
    by_neuron = ops.permute(trace, [1, 0, 2])  # (D, B, M)
    pre = ops.permute(ops.matmul(by_neuron, weight), [1, 0, 2]) + bias  # (B, D, 2H)
    batch, neurons, half = pre.shape[0], pre.shape[1], pre.shape[2] // 2
    pre = ops.rebind(pre, [batch, neurons, 2 * half])  # asserts an even 2H for the reshape
    halves = ops.reshape(pre, [batch, neurons, 2, half])
    return halves[:, :, 0, :], halves[:, :, 1, :]


def _nlm_composition(trace, weight, bias):
    value, gate = _nlm_pre(trace, weight, bias)
    return value * ops.sigmoid(gate)


def _nlm_backward_composition(trace, weight, bias, grad_output):
    value, gate = _nlm_pre(trace, weight, bias)
    gate = ops.sigmoid(gate)
    grad_output = ops.rebind(grad_output, value.shape)
    d_pre = ops.stack([grad_output * gate, grad_output * value * gate * (1.0 - gate)], axis=2)
    d_pre = ops.rebind(ops.reshape(d_pre, [d_pre.shape[0], d_pre.shape[1], -1]),
                       [trace.shape[0], trace.shape[1], weight.shape[2]])  # (B, D, 2H)
    d_pre_by_neuron = ops.permute(d_pre, [1, 0, 2])  # (D, B, 2H)
    d_trace = ops.permute(ops.matmul(d_pre_by_neuron, ops.permute(weight, [0, 2, 1])), [1, 0, 2])
    d_weight = ops.matmul(ops.permute(trace, [1, 2, 0]), d_pre_by_neuron)
    d_bias = ops.squeeze(ops.sum(d_pre, axis=0), 0)
    return d_trace, d_weight, d_bias


def _nlm_torch(trace, weight, bias):
    pre = torch.bmm(trace.transpose(0, 1), weight).transpose(0, 1) + bias
    return torch.nn.functional.glu(pre, dim=-1)


def _nlm_backward_torch(trace, weight, bias, grad_output):
    pre = torch.bmm(trace.transpose(0, 1), weight).transpose(0, 1) + bias
    value, gate = pre.chunk(2, dim=-1)
    gate = torch.sigmoid(gate)
    d_pre = torch.cat([grad_output * gate, grad_output * value * gate * (1 - gate)], dim=-1)
    d_pre_by_neuron = d_pre.transpose(0, 1)
    d_trace = torch.bmm(d_pre_by_neuron, weight.transpose(1, 2)).transpose(0, 1)
    d_weight = torch.bmm(trace.permute(1, 2, 0), d_pre_by_neuron)
    return d_trace, d_weight, d_pre.sum(0)


def fused_cases(rng) -> list[Case]:
    """Build cases of the engine's fused ops as ``modgrad.compile`` lowers them.

    ``mojo`` is the lowering with the kernel on and ``max_ops`` the one with it off, so the
    two columns compare the settings of ``modgrad.compile(kernels=...)``. The first shape of
    each op is the maze CTM's: D 512, B 16, M 25, H 32 and 32 sync pairs. The NLM's second
    stage in that CTM is M 32, H 1 (`deep_nlms`).
    """
    cases = []
    nlm_shapes = [(16, 512, 25, 32), (16, 512, 32, 1), (1, 512, 25, 32), (64, 512, 25, 32)]
    for batch, neurons, memory, hidden in nlm_shapes:
        trace = _f32(rng, neurons, batch, memory)  # (D, B, M), the CTM's layout
        weight = _f32(rng, neurons, memory, 2 * hidden) / np.float32(np.sqrt(memory))
        bias = _f32(rng, neurons, 2 * hidden)
        grad_output = _f32(rng, neurons, batch, hidden)
        shape = dict(D=neurons, B=batch, M=memory, H=hidden)
        # The engine's shape rule makes 2H static, and the composition slices at H.
        types = [(DType.float32, ["D", "B", "M"]), (DType.float32, ["D", "M", 2 * hidden]),
                 (DType.float32, ["D", 2 * hidden])]
        macs = batch * neurons * memory * 2 * hidden
        cases.append(Case(
            "fused_nlm_glu", shape, [trace, weight, bias], types,
            ours=lambda *v: _lower_fused("nlm_glu", v, kernel=True),
            composition=lambda *v: _lower_fused("nlm_glu", v, kernel=False),
            numpy_fn=lambda *v: fused.nlm_glu_p.impl(*v),
            torch_fn=_nlm_glu_torch,
            bytes=_nbytes(trace, weight, bias) + grad_output.nbytes,
            flops=2 * macs + 4 * batch * neurons * hidden,
        ))
        cases.append(Case(
            "fused_nlm_glu_backward", shape, [trace, weight, bias, grad_output],
            types + [(DType.float32, ["D", "B", hidden])],
            ours=lambda *v: _lower_fused("nlm_glu_backward", v, kernel=True),
            composition=lambda *v: _lower_fused("nlm_glu_backward", v, kernel=False),
            numpy_fn=lambda *v: fused.nlm_glu_backward_p.impl(*v),
            torch_fn=_nlm_glu_backward_torch,
            bytes=2 * _nbytes(trace, weight, bias) + grad_output.nbytes,
            flops=6 * macs,
        ))
    for batch, neurons, pairs in [(16, 512, 32), (64, 512, 4096)]:
        # int64 indices, as in the CTM's pair buffers. The engine op casts them for the kernel.
        forward_inputs, grads, types = _sync_arrays(rng, batch, neurons, pairs, np.int64)
        z, _, _, decay, alpha, _ = forward_inputs
        shape = dict(B=batch, D=neurons, S=pairs)
        cases.append(Case(
            "fused_sync_update", shape, forward_inputs, types,
            ours=lambda *v: _lower_fused("sync_update", v, kernel=True),
            composition=lambda *v: _lower_fused("sync_update", v, kernel=False),
            numpy_fn=lambda *v: fused.sync_update_p.impl(*v),
            torch_fn=_sync_torch,
            bytes=_nbytes(*forward_inputs) + 3 * alpha.nbytes,
            flops=5 * batch * pairs,
        ))
        backward_inputs = forward_inputs + grads
        cases.append(Case(
            "fused_sync_update_backward", shape, backward_inputs, types + [(DType.float32, ["B", "S"])] * 3,
            ours=lambda *v: _lower_fused("sync_update_backward", v, kernel=True),
            composition=lambda *v: _lower_fused("sync_update_backward", v, kernel=False),
            numpy_fn=lambda *v: fused.sync_update_backward_p.impl(*v),
            torch_fn=_sync_backward_torch,
            bytes=_nbytes(*backward_inputs) + z.nbytes + decay.nbytes + 2 * alpha.nbytes,
            flops=20 * batch * pairs,
        ))
    return cases


def trace_cases(rng) -> list[Case]:
    """Build cases of the CTM's trace window (``ops.trace_push``) and its gradient, lowered as
    ``fused_cases`` lowers the fused ops. The window is the maze CTM's: D 512, B 16, M 25."""
    cases = []
    for neurons, batch, memory in [(512, 16, 25), (512, 64, 25)]:
        trace, grad, other = (_f32(rng, neurons, batch, memory) for _ in range(3))
        new = _f32(rng, neurons, batch)
        shape = dict(D=neurons, B=batch, M=memory)
        window = (DType.float32, ["D", "B", memory])
        cases.append(Case(
            "fused_trace_push", shape, [trace, new], [window, (DType.float32, ["D", "B"])],
            ours=lambda *v: _lower_fused("trace_push", v, kernel=True),
            composition=lambda *v: _lower_fused("trace_push", v, kernel=False),
            numpy_fn=lambda *v: fused.trace_push_p.impl(*v),
            torch_fn=lambda t, n: torch.cat([t[..., 1:], n[..., None]], -1),
            bytes=2 * trace.nbytes + new.nbytes,
            flops=0,
        ))
        for grads in ([grad], [grad, other]):
            cases.append(Case(
                "fused_trace_push_backward" + ("_sum" if len(grads) == 2 else ""), shape, grads,
                [window] * len(grads),
                ours=lambda *v: _lower_fused("trace_push_backward", v, kernel=True),
                composition=lambda *v: _lower_fused("trace_push_backward", v, kernel=False),
                numpy_fn=lambda *v: fused.trace_push_backward_p.impl(*v),
                torch_fn=_trace_push_backward_torch,
                bytes=_nbytes(*grads) + trace.nbytes + new.nbytes,
                flops=(len(grads) - 1) * trace.size,
            ))
    return cases


def norm_cases(rng) -> list[Case]:
    """Build cases of the layer norm (``layer_norm``, plain and with SiLU) and its gradient at the
    widths of the maze CTM's U-Net synapse (16 rows) and at a transformer's (512 tokens of
    Qwen2.5-0.5B's 896)."""
    cases = []
    for rows, size in [(16, 16), (16, 441), (16, 512), (512, 896)]:
        x, grad = _f32(rng, rows, size), _f32(rng, rows, size)
        gamma, beta = _f32(rng, size), _f32(rng, size)
        rows_type, vector_type = (DType.float32, ["R", size]), (DType.float32, [size])
        for activation in ("none", "silu"):
            suffix = "_silu" if activation == "silu" else ""
            cases.append(_norm_case(
                "layer_norm", suffix, activation, [x, gamma, beta], [rows_type, vector_type, vector_type],
                torch_fn=_layer_norm_torch, bytes=2 * x.nbytes + 2 * gamma.nbytes, flops=8 * x.size,
            ))
            inputs, types = [x, gamma, grad], [rows_type, vector_type, rows_type]
            if activation == "silu":
                inputs, types = inputs + [beta], types + [vector_type]
            cases.append(_norm_case(
                "layer_norm_backward", suffix, activation, inputs, types,
                torch_fn=_layer_norm_backward_torch, bytes=3 * x.nbytes + 3 * gamma.nbytes, flops=12 * x.size,
            ))
    return cases


def _norm_case(prim: str, suffix: str, activation: str, inputs, types, torch_fn, bytes: int, flops: int) -> Case:
    """Return the case of one layer norm primitive; the kernel name puts ``suffix`` after "layer_norm"."""
    attrs = {"eps": 1e-5, "activation": activation}
    shape = dict(R=inputs[0].shape[0], D=inputs[0].shape[1])
    return Case(
        prim.replace("layer_norm", "layer_norm" + suffix, 1), shape, inputs, types,
        ours=lambda *v: lower(prim, list(v), {**attrs, "kernel": True}, v[0].device),
        composition=lambda *v: lower(prim, list(v), attrs, v[0].device),
        numpy_fn=lambda *v: getattr(norm, prim + "_p").impl(*v, **attrs),
        torch_fn=lambda *v: torch_fn(*v, activation=activation),
        bytes=bytes,
        flops=flops,
    )


def _layer_norm_torch(x, gamma, beta, activation):
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, beta, eps=1e-5)
    return torch.nn.functional.silu(y) if activation == "silu" else y


def _layer_norm_backward_torch(x, gamma, grad, *beta, activation):
    with torch.enable_grad():  # the timing loop runs under no_grad
        x, gamma = x.detach().requires_grad_(), gamma.detach().requires_grad_()
        beta = beta[0].detach().requires_grad_() if beta else torch.zeros_like(gamma, requires_grad=True)
        out = _layer_norm_torch(x, gamma, beta, activation)
        return torch.autograd.grad(out, (x, gamma, beta), grad)


def _trace_push_backward_torch(*grads):
    grad = grads[0] if len(grads) == 1 else grads[0] + grads[1]
    return torch.nn.functional.pad(grad[..., :-1], (1, 0)), grad[..., -1]


def _lower_fused(name: str, values, kernel: bool) -> list[TensorValue]:
    return lower(name, list(values), {"kernel": kernel}, values[0].device)


def _nlm_glu_torch(trace, weight, bias):
    return torch.nn.functional.glu(torch.bmm(trace, weight) + bias[:, None, :], dim=-1)


def _nlm_glu_backward_torch(trace, weight, bias, grad_output):
    pre = torch.bmm(trace, weight) + bias[:, None, :]
    value, gate = pre.chunk(2, dim=-1)
    gate = torch.sigmoid(gate)
    d_pre = torch.cat([grad_output * gate, grad_output * value * gate * (1 - gate)], dim=-1)
    return torch.bmm(d_pre, weight.transpose(1, 2)), torch.bmm(trace.transpose(1, 2), d_pre), d_pre.sum(1)


def matvec_cases(rng) -> list[Case]:
    cases = []
    # A static K lets the kernel split it (kernels.MATVEC_ROWS_PER_SLICE), as in a compiled decoder.
    # The last four shapes are Qwen2.5-0.5B's decode products: gate/up, down and the tied output head.
    shapes = [(1, 4096, 4096), (8, 4096, 4096), (1, 896, 9728), (1, 4864, 896), (8, 4864, 896), (1, 896, 151936)]
    for batch, inner, columns in shapes:
        x = _f32(rng, batch, inner)
        w = _f32(rng, inner, columns)
        y_bytes = batch * columns * 4
        cases.append(Case(
            "matvec", dict(B=batch, K=inner, N=columns), [x, w],
            [(DType.float32, ["B", inner]), (DType.float32, [inner, "N"])],
            ours=lambda x, w: [kernels.matvec(x, w)],
            composition=lambda x, w: [ops.matmul(x, w)],
            numpy_fn=reference.matvec,
            torch_fn=lambda x, w: x @ w,
            bytes=_nbytes(x, w) + y_bytes,
            flops=2 * batch * inner * columns,
        ))
    # bfloat16 weights enter as their uint16 bit patterns, viewed as bfloat16 on the device.
    # numpy has no bfloat16, so that column is left out.
    batch, inner, columns = 1, 4096, 4096
    x = _f32(rng, batch, inner)
    w_bits = _bfloat16_bits(_f32(rng, inner, columns))
    cases.append(Case(
        "matvec_bf16_weights", dict(B=batch, K=inner, N=columns), [x, w_bits],
        [(DType.float32, ["B", inner]), (DType.bfloat16, [inner, "N"])],
        ours=lambda x, w: [kernels.matvec(x, w)],
        composition=lambda x, w: [ops.matmul(x, w.cast(DType.float32))],
        numpy_fn=None,
        torch_fn=_matvec_bf16_torch,
        bytes=_nbytes(x, w_bits) + batch * columns * 4,
        flops=2 * batch * inner * columns,
    ))
    return cases


def _bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """Return the bfloat16 bit patterns (round to nearest even) of float32 values as uint16."""
    bits = array.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _matvec_bf16_torch(x, w_bits):
    return (x.to(torch.bfloat16) @ w_bits.view(torch.bfloat16)).float()


def adamw_cases(rng) -> list[Case]:
    cases = []
    settings = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10)
    for size in [1 << 16, 1 << 22]:
        param, grad, m = (_f32(rng, size) for _ in range(3))
        v = rng.uniform(0, 1, size).astype(np.float32)
        hyper = adamw_hyper(**settings)
        cases.append(Case(
            "adamw_fused", dict(N=size), [param, grad, m, v, hyper],
            [(DType.float32, ["N"])] * 4 + [(DType.float32, [8])],
            ours=lambda *v: list(kernels.adamw_fused(*v)),
            composition=lambda *v: list(_adamw_composition(*v)),
            numpy_fn=lambda p, g, m, v, _h: reference.adamw_fused(p, g, m, v, **settings),
            torch_fn=None if torch is None else _adamw_torch(size, settings),
            bytes=7 * param.nbytes,
            flops=18 * size,
        ))
    return cases


def _adamw_composition(param, grad, m, v, hyper):
    coefficient = [ops.squeeze(hyper[i : i + 1], 0) for i in range(8)]
    clip, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, root_c2, eps = coefficient
    g = grad * clip
    m_new = m + one_minus_beta1 * (g - m)
    v_new = v * beta2 + one_minus_beta2 * (g * g)
    denom = ops.sqrt(v_new) / root_c2 + eps
    return param * decay - step_size * (m_new / denom), m_new, v_new


def _adamw_torch(size, settings):
    """torch's fused CPU AdamW, updating its own state in place (like a training step)."""
    param = torch.nn.Parameter(torch.randn(size))
    param.grad = torch.randn(size)
    optimizer = torch.optim.AdamW(
        [param], lr=settings["lr"], betas=(settings["beta1"], settings["beta2"]),
        eps=settings["eps"], weight_decay=settings["weight_decay"], fused=True,
    )
    return lambda *_: optimizer.step()


def mha_cases(rng) -> list[Case]:
    """Single-query attention: Qwen2.5-0.5B decode heads, and the CTMs' reads of their observation tokens."""
    from modgrad.engine.prims.attention import _single_query_backward_impl
    from modgrad.graphs.attention import _single_query_attention, _single_query_attention_backward

    cases = []
    shapes = [(1, 1024, 14, 64), (8, 1024, 14, 64), (1, 4096, 8, 128),
              (16, 100, 8, 16),  # the CTM of bench/ctm_train.py
              (8, 121, 4, 32)]  # the maze CTM
    for batch, keys, heads, head_dim in shapes:
        q = _f32(rng, batch, heads, head_dim)
        k = _f32(rng, batch, keys, heads, head_dim)
        v = _f32(rng, batch, keys, heads, head_dim)
        kv = (DType.float32, ["B", "n", "H", "dh"])
        cases.append(Case(
            "mha_single_query", dict(B=batch, n=keys, H=heads, dh=head_dim), [q, k, v],
            [(DType.float32, ["B", "H", "dh"]), kv, kv],
            ours=lambda q, k, v: [kernels.mha_single_query(q, k, v)],
            composition=lambda q, k, v: [_single_query_attention(q, k, v, device=None)],
            numpy_fn=reference.mha_single_query,
            torch_fn=_mha_torch,
            bytes=_nbytes(q, k, v) + q.nbytes,
            flops=4 * batch * heads * keys * head_dim,
        ))
        grad = _f32(rng, batch, heads, head_dim)
        cases.append(Case(
            "mha_single_query_backward", dict(B=batch, n=keys, H=heads, dh=head_dim), [q, k, v, grad],
            [(DType.float32, ["B", "H", "dh"]), kv, kv, (DType.float32, ["B", "H", "dh"])],
            ours=lambda *xs: list(kernels.mha_single_query_backward(*xs)),
            composition=lambda *xs: _single_query_attention_backward(*xs, device=None),
            numpy_fn=_single_query_backward_impl,
            torch_fn=_mha_backward_torch,
            bytes=3 * _nbytes(q, k, v),
            flops=12 * batch * heads * keys * head_dim,  # three passes of q.k, two of grad.v, d_q, d_k, d_v
        ))
    return cases


def _mha_backward_torch(q, k, v, grad):
    scores = torch.einsum("bhd,bnhd->bhn", q, k) * q.shape[-1] ** -0.5
    p = torch.softmax(scores, dim=-1)
    dp = torch.einsum("bhd,bnhd->bhn", grad, v)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
    d_q = torch.einsum("bhn,bnhd->bhd", ds, k)
    d_k = torch.einsum("bhn,bhd->bnhd", ds, q)
    d_v = torch.einsum("bhn,bhd->bnhd", p, grad)
    return d_q, d_k, d_v


def _mha_torch(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    ).squeeze(2)


def decode_cases(rng) -> list[Case]:
    """Qwen2.5-0.5B's attention shapes (14 query heads over 2 key/value heads of 64) at one decode step."""
    from modgrad.graphs.attention import _decode_attention

    cases = []
    for batch, cached, heads, kv_heads, head_dim in [(1, 1024, 14, 2, 64), (8, 1024, 14, 2, 64), (1, 4096, 14, 2, 64)]:
        q = _f32(rng, batch, heads, head_dim)
        k, v = _f32(rng, batch, kv_heads, head_dim), _f32(rng, batch, kv_heads, head_dim)
        past_k = _f32(rng, cached, batch, kv_heads, head_dim)
        past_v = _f32(rng, cached, batch, kv_heads, head_dim)
        new = (DType.float32, ["B", kv_heads, head_dim])
        cache = (DType.float32, ["L", "B", kv_heads, head_dim])
        cases.append(Case(
            "decode_attention", dict(B=batch, L=cached, H=heads, H_kv=kv_heads, dh=head_dim),
            [q, k, v, past_k, past_v], [(DType.float32, ["B", heads, head_dim]), new, new, cache, cache],
            ours=lambda *xs: [kernels.decode_attention(*xs)],
            composition=lambda *xs: [_decode_attention(*xs, device=None)],
            numpy_fn=reference.decode_attention,
            torch_fn=_decode_torch,
            bytes=_nbytes(q, k, v, past_k, past_v) + q.nbytes,
            flops=4 * batch * heads * (cached + 1) * head_dim,
        ))
    return cases


def _decode_torch(q, k, v, past_k, past_v):
    keys = torch.cat([past_k.permute(1, 2, 0, 3), k.unsqueeze(2)], 2)  # (B, H_kv, L + 1, dh)
    values = torch.cat([past_v.permute(1, 2, 0, 3), v.unsqueeze(2)], 2)
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), keys, values, enable_gqa=True)
    return out.squeeze(2)


def causal_cases(rng) -> list[Case]:
    """Prefill of a prompt with Qwen2.5-0.5B's attention shapes (14 query heads over 2 key/value heads of 64)."""
    from modgrad.graphs.attention import _causal_attention

    cases = []
    for batch, tokens, heads, kv_heads, head_dim in [(1, 512, 14, 2, 64), (4, 256, 14, 2, 64)]:
        q = _f32(rng, batch, tokens, heads, head_dim)
        k, v = _f32(rng, batch, tokens, kv_heads, head_dim), _f32(rng, batch, tokens, kv_heads, head_dim)
        positions = np.arange(tokens, dtype=np.int64)
        kv = (DType.float32, ["B", "T", kv_heads, head_dim])
        cases.append(Case(
            "causal_attention", dict(B=batch, T=tokens, H=heads, H_kv=kv_heads, dh=head_dim),
            [q, k, v, positions], [(DType.float32, ["B", "T", heads, head_dim]), kv, kv, (DType.int64, ["T"])],
            ours=lambda *xs: [kernels.causal_attention(*xs)],
            composition=lambda *xs: [_causal_attention(*xs, device=None)],
            numpy_fn=reference.causal_attention,
            torch_fn=_causal_torch,
            bytes=_nbytes(q, k, v) + q.nbytes,
            flops=2 * batch * heads * tokens * (tokens + 1) * head_dim,  # the visible half of QK^T and PV
        ))
    return cases


def _causal_torch(q, k, v, positions):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


CASES: dict[str, Callable[[np.random.Generator], list[Case]]] = {
    "sync_update": sync_cases,
    "nlm": nlm_cases,
    "fused": fused_cases,
    "trace": trace_cases,
    "norm": norm_cases,
    "matvec": matvec_cases,
    "adamw_fused": adamw_cases,
    "mha_single_query": mha_cases,
    "decode_attention": decode_cases,
    "causal_attention": causal_cases,
}


# --------------------------------------------------------------------------------------------
# Running


class Runner:
    """Compiles each (kernel, implementation) graph once and times it on device buffers."""

    def __init__(self, device_name: str):
        self.device = Accelerator() if device_name == "gpu" else CPU()
        self.device_ref = DeviceRef.GPU() if device_name == "gpu" else DeviceRef.CPU()
        self.session = InferenceSession(devices=[self.device])
        self.models: dict[str, object] = {}
        self.compile_seconds: dict[str, float] = {}

    def model(self, case: Case, label: str, build):
        # Cases with the same input types share one graph, and each set of static sizes gets its own.
        signature = ";".join(",".join(str(d) for d in shape) for _, shape in case.input_types)
        key = f"{case.kernel}/{label}[{signature}]"
        if key not in self.models:
            types = [TensorType(dtype, shape, self.device_ref) for dtype, shape in case.input_types]
            begin = time.perf_counter()
            with Graph(f"{case.kernel}_{label}", input_types=types,
                       custom_extensions=[kernels.kernel_library_path()]) as graph:
                graph.output(*build(*[value.tensor for value in graph.inputs]))
            self.models[key] = self.session.load(graph)
            self.compile_seconds[key] = time.perf_counter() - begin
        return self.models[key]

    def time_graph(self, case: Case, label: str, build) -> tuple[float, float]:
        model = self.model(case, label, build)
        buffers = []
        for array, (dtype, _shape) in zip(case.inputs, case.input_types):
            buffer = Buffer.from_numpy(array)
            if dtype == DType.bfloat16:
                buffer = buffer.view(DType.bfloat16)
            buffers.append(buffer.to(self.device))
        sync = self.device.synchronize if isinstance(self.device, Accelerator) else (lambda: None)
        return measure(lambda: model.execute(*buffers), sync)


def bench_case(runner: Runner, case: Case, copy_gb_s: float) -> dict:
    times = {
        "mojo": runner.time_graph(case, "mojo", case.ours),
        "max_ops": runner.time_graph(case, "max_ops", case.composition),
    }
    if case.numpy_fn is not None:
        times["numpy"] = measure(lambda: case.numpy_fn(*case.inputs))
    if torch is not None and case.torch_fn is not None:
        tensors = [torch.from_numpy(array.view(np.int16) if array.dtype == np.uint16 else array)
                   for array in case.inputs]
        with torch.no_grad():
            times["torch"] = measure(lambda: case.torch_fn(*tensors))
    medians = {name: median for name, (median, _) in times.items()}
    fastest = {name: best for name, (_, best) in times.items()}
    gb_s = {name: case.bytes / seconds / 1e9 for name, seconds in fastest.items()}
    return {
        "kernel": case.kernel,
        "shape": case.shape,
        "device": "gpu" if isinstance(runner.device, Accelerator) else "cpu",
        "time_us": {name: round(seconds * 1e6, 2) for name, seconds in medians.items()},
        "min_time_us": {name: round(seconds * 1e6, 2) for name, seconds in fastest.items()},
        "gb_s": {name: round(value, 3) for name, value in gb_s.items()},
        "gflop_s": {name: round(case.flops / seconds / 1e9, 3) for name, seconds in fastest.items()},
        "bandwidth_fraction": {name: round(value / copy_gb_s, 3) for name, value in gb_s.items()},
        "bytes": case.bytes,
        "flops": case.flops,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="where the MAX graphs run; numpy and torch always run on the CPU")
    parser.add_argument("--kernels", nargs="+", choices=sorted(CASES), default=sorted(CASES),
                        help="kernel families to run (default: all)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--quick", action="store_true",
                        help="one shape per kernel (the first listed), for a time-limited check")
    parser.add_argument("--skip-build-times", action="store_true",
                        help="do not time the cold and warm kernel package builds")
    args = parser.parse_args(argv)

    out_file = args.out.open("a") if args.out else None
    torch_threads = torch.get_num_threads() if torch is not None else None
    emit({"machine": {"cpus": os.cpu_count(), "torch_threads": torch_threads,
                      "numpy": np.__version__, "torch": getattr(torch, "__version__", None)}}, out_file)
    if not args.skip_build_times:
        emit({"kernel_build_seconds": build_times()}, out_file)
    copy_gb_s = copy_bandwidth_gb_s()
    read = read_gb_s()
    emit({"copy_gb_s": round(copy_gb_s, 3), "read_gb_s": None if read is None else round(read, 3),
          "matmul_gflop_s": round(matmul_gflop_s(), 3)}, out_file)

    runner = Runner(args.device)
    rng = np.random.default_rng(0)
    for family in args.kernels:
        seen = set()
        for case in CASES[family](rng):
            if args.quick and case.kernel in seen:
                continue
            seen.add(case.kernel)
            emit(bench_case(runner, case, copy_gb_s), out_file)
    emit({"graph_compile_seconds": {key: round(seconds, 2) for key, seconds in runner.compile_seconds.items()}},
         out_file)
    if out_file is not None:
        out_file.close()


if __name__ == "__main__":
    main()
