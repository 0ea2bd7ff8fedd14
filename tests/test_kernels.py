"""The Mojo custom-op kernels against their numpy oracles.

Each kernel compiles into one MAX graph with symbolic dimensions, and that one graph is run on
every shape case: lengths 1, 3, 59, 96, 98, 224, 1000, widths 1, 9, 32, 512 and memories
2, 4, 8, 25, which cover empty, scalar, odd, one-past and many-vector tails of the SIMD loops.

Tolerances (float32 kernels, float64 oracles computed from the same float32 inputs):
elementwise results use rtol = atol = 1e-5. A result that sums n products gets, in addition,
an absolute slack of 4 * sqrt(n) * eps32 * sum|terms|, the usual estimate of float32
summation error; the kernels sum in another order than the oracle (SIMD lanes, FMA).

MODGRAD_TEST_DEVICE=gpu runs the same checks on the first MAX accelerator.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("max")

from max.driver import CPU, Accelerator, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, ops

from graphs import kernels
from modgrad.kernels import reference

pytestmark = pytest.mark.max

DEVICE = os.environ.get("MODGRAD_TEST_DEVICE", "cpu")
EPS32 = float(np.finfo(np.float32).eps)
LENGTHS = (1, 3, 59, 96, 98, 224, 1000)
WIDTHS = (1, 9, 32, 512)
MEMORIES = (2, 4, 8, 25)


@pytest.fixture(scope="module")
def device():
    if DEVICE == "gpu":
        return Accelerator()
    if DEVICE != "cpu":
        raise ValueError(f"MODGRAD_TEST_DEVICE must be cpu or gpu, got {DEVICE!r}")
    return CPU()


@pytest.fixture(scope="module")
def device_ref(device) -> DeviceRef:
    return DeviceRef.GPU() if DEVICE == "gpu" else DeviceRef.CPU()


@pytest.fixture(scope="module")
def session(device) -> InferenceSession:
    return InferenceSession(devices=[device])


def compile_graph(session, name, input_types, build):
    with Graph(name, input_types=input_types, custom_extensions=[kernels.kernel_library_path()]) as graph:
        outputs = build(*[value.tensor for value in graph.inputs])
        graph.output(*outputs)
    return session.load(graph)


def run(model, device, *arrays: np.ndarray) -> list[np.ndarray]:
    buffers = [Buffer.from_numpy(np.require(array, requirements="C")).to(device) for array in arrays]
    return [result.to(CPU()).to_numpy() for result in model.execute(*buffers)]


def f32(device_ref, *shape) -> TensorType:
    return TensorType(DType.float32, list(shape), device_ref)


def assert_close(actual, expected, *, terms=1, abs_sum=None, rtol=1e-5, atol=1e-5):
    """Compare a float32 kernel result with a float64 oracle (see the module docstring)."""
    assert actual.shape == expected.shape
    allowed = atol + rtol * np.abs(expected)
    if abs_sum is not None:
        allowed = allowed + 4 * np.sqrt(terms) * EPS32 * abs_sum
    error = np.abs(actual.astype(np.float64) - expected)
    worst = np.unravel_index(np.argmax(error - allowed), error.shape) if error.size else ()
    assert np.all(error <= allowed), (
        f"{np.sum(error > allowed)} of {error.size} elements off; worst at {worst}: "
        f"got {actual[worst]}, expected {expected[worst]}, allowed error {allowed[worst]}"
    )


def as64(*arrays):
    return [np.asarray(array, dtype=np.float64) if array.dtype.kind == "f" else array for array in arrays]


# --------------------------------------------------------------------------------------------
# sync_update


SYNC_CASES = [  # (B, D, S)
    (1, 1, 1),
    (3, 9, 3),
    (2, 32, 59),
    (1, 512, 96),
    (4, 9, 98),
    (2, 1, 224),
    (3, 512, 1000),
]


@pytest.fixture(scope="module")
def sync_model(session, device_ref):
    i32 = TensorType(DType.int32, ["S"], device_ref)
    bs = f32(device_ref, "B", "S")
    input_types = [f32(device_ref, "B", "D"), i32, i32, f32(device_ref, "S"), bs, bs, bs, bs, bs]

    def build(z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync):
        forward = kernels.sync_update(z, left, right, decay, alpha, beta)
        backward = kernels.sync_update_backward(
            z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync
        )
        return [*forward, *backward]

    return compile_graph(session, "sync_update_test", input_types, build)


def sync_inputs(rng, batch, neurons, pairs):
    z = rng.standard_normal((batch, neurons)).astype(np.float32)
    left = rng.integers(0, neurons, pairs).astype(np.int32)
    right = rng.integers(0, neurons, pairs).astype(np.int32)
    decay = rng.uniform(0.0, 1.0, pairs).astype(np.float32)
    alpha = rng.standard_normal((batch, pairs)).astype(np.float32)
    beta = rng.uniform(0.0, 4.0, (batch, pairs)).astype(np.float32)
    grads = [rng.standard_normal((batch, pairs)).astype(np.float32) for _ in range(3)]
    return [z, left, right, decay, alpha, beta, *grads]


@pytest.mark.parametrize("batch,neurons,pairs", SYNC_CASES)
def test_sync_update_matches_reference(sync_model, device, batch, neurons, pairs):
    rng = np.random.default_rng(batch * 1000 + pairs)
    inputs = sync_inputs(rng, batch, neurons, pairs)
    alpha, beta, sync, *_ = run(sync_model, device, *inputs)
    expected = reference.sync_update(*as64(*inputs[:6]))
    assert_close(alpha, expected[0])
    assert_close(beta, expected[1])
    assert_close(sync, expected[2])


@pytest.mark.parametrize("batch,neurons,pairs", SYNC_CASES)
def test_sync_update_backward_matches_reference(sync_model, device, batch, neurons, pairs):
    rng = np.random.default_rng(batch * 1000 + pairs + 1)
    inputs = sync_inputs(rng, batch, neurons, pairs)
    d_z, d_decay, d_alpha, d_beta = run(sync_model, device, *inputs)[3:]
    expected = reference.sync_update_backward(*as64(*inputs))
    z, left, right, decay, alpha, beta, grad_alpha, grad_beta, grad_sync = as64(*inputs)
    # d_z sums one term per pair touching the neuron; bound the slack by all pairs.
    abs_grads = reference.sync_update_backward(
        np.abs(z), left, right, decay, alpha, beta, np.abs(grad_alpha), 0 * grad_beta, np.abs(grad_sync)
    )
    assert_close(d_z, expected[0], terms=2 * pairs, abs_sum=np.abs(abs_grads[0]))
    abs_decay_terms = (np.abs(alpha) + np.abs(beta)) * (
        np.abs(grad_alpha) + np.abs(grad_beta) + np.abs(grad_sync) * (1 + np.abs(expected[0]).max())
    )
    assert_close(d_decay, expected[1], terms=2 * batch, abs_sum=abs_decay_terms.sum(axis=0))
    assert_close(d_alpha, expected[2])
    assert_close(d_beta, expected[3])


@pytest.mark.skipif(DEVICE != "cpu", reason="pair indices are range-checked on the CPU only")
def test_sync_update_rejects_bad_pair(sync_model, device):
    rng = np.random.default_rng(0)
    inputs = sync_inputs(rng, 2, 9, 5)
    inputs[2][3] = 9  # right[3] == D
    with pytest.raises(Exception, match="out of range"):
        run(sync_model, device, *inputs)


# --------------------------------------------------------------------------------------------
# nlm_forward / nlm_backward


NLM_CASES = [  # (B, D, M, H)
    (1, 1, 2, 1),
    (3, 9, 4, 3),
    (2, 32, 8, 59),
    (1, 512, 25, 4),
    (59, 9, 25, 1),
    (3, 32, 2, 96),
    (2, 9, 8, 98),
    (1, 1, 25, 224),
]


@pytest.fixture(scope="module")
def nlm_model(session, device_ref):
    input_types = [
        f32(device_ref, "B", "D", "M"),
        f32(device_ref, "D", "M", "O"),
        f32(device_ref, "D", "O"),
        f32(device_ref, "B", "D", "H"),
    ]

    def build(trace, weight, bias, grad_output):
        output = kernels.nlm_forward(trace, weight, bias)
        output = ops.rebind(output, grad_output.shape)
        return [output, *kernels.nlm_backward(trace, weight, bias, grad_output)]

    return compile_graph(session, "nlm_test", input_types, build)


def nlm_inputs(rng, batch, neurons, memory, hidden):
    trace = rng.standard_normal((batch, neurons, memory)).astype(np.float32)
    weight = (rng.standard_normal((neurons, memory, 2 * hidden)) / np.sqrt(memory)).astype(np.float32)
    bias = rng.standard_normal((neurons, 2 * hidden)).astype(np.float32)
    grad_output = rng.standard_normal((batch, neurons, hidden)).astype(np.float32)
    return [trace, weight, bias, grad_output]


@pytest.mark.parametrize("batch,neurons,memory,hidden", NLM_CASES)
def test_nlm_matches_reference(nlm_model, device, batch, neurons, memory, hidden):
    rng = np.random.default_rng(batch + neurons + memory + hidden)
    inputs = nlm_inputs(rng, batch, neurons, memory, hidden)
    output, d_trace, d_weight, d_bias = run(nlm_model, device, *inputs)
    trace, weight, bias, grad_output = as64(*inputs)
    abs_pre = reference.nlm_pre_activations(np.abs(trace), np.abs(weight), np.abs(bias))
    # The GLU output inherits the error of pre (a sum of M + 1 terms) scaled by at most ~1.
    assert_close(output, reference.nlm_forward(trace, weight, bias), terms=memory + 1,
                 abs_sum=abs_pre[..., :hidden] + abs_pre[..., hidden:])

    expected = reference.nlm_backward(trace, weight, bias, grad_output)
    # |d_pre| <= |grad_output| * (1 + |value|); bound the contractions with that.
    abs_d_pre = np.concatenate([np.abs(grad_output), np.abs(grad_output) * (1 + abs_pre[..., :hidden])], -1)
    assert_close(d_trace, expected[0], terms=2 * hidden,
                 abs_sum=np.einsum("bdo,dmo->bdm", abs_d_pre, np.abs(weight)))
    assert_close(d_weight, expected[1], terms=batch,
                 abs_sum=np.einsum("bdm,bdo->dmo", np.abs(trace), abs_d_pre))
    assert_close(d_bias, expected[2], terms=batch, abs_sum=abs_d_pre.sum(axis=0))


# --------------------------------------------------------------------------------------------
# matvec


MATVEC_CASES = [  # (B, K, N)
    (1, 1, 1),
    (3, 9, 3),
    (1, 512, 1000),
    (4, 59, 96),
    (5, 224, 98),
    (2, 1000, 59),
    (7, 32, 224),
    (9, 3, 512),
]


def round_to_bfloat16(array: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


@pytest.fixture(scope="module")
def matvec_model(session, device_ref):
    input_types = [f32(device_ref, "B", "K"), f32(device_ref, "K", "N")]

    def build(x, w):
        return [kernels.matvec(x, w), kernels.matvec(x, w.cast(DType.bfloat16))]

    return compile_graph(session, "matvec_test", input_types, build)


@pytest.mark.parametrize("batch,inner,columns", MATVEC_CASES)
def test_matvec_matches_reference(matvec_model, device, batch, inner, columns):
    rng = np.random.default_rng(batch * inner + columns)
    x = rng.standard_normal((batch, inner)).astype(np.float32)
    w = rng.standard_normal((inner, columns)).astype(np.float32)
    y, y_bf16 = run(matvec_model, device, x, w)
    x64, w64 = as64(x, w)
    abs_sum = np.abs(x64) @ np.abs(w64)
    assert_close(y, reference.matvec(x64, w64), terms=inner, abs_sum=abs_sum)
    # bfloat16 weights: the rounding of w is part of the oracle, the sum is float32.
    w_bf16 = round_to_bfloat16(w).astype(np.float64)
    assert_close(y_bf16, reference.matvec(x64, w_bf16), terms=inner, abs_sum=abs_sum)


# --------------------------------------------------------------------------------------------
# adamw_fused


@pytest.fixture(scope="module")
def adamw_model(session, device_ref):
    flat = f32(device_ref, "N")
    scalar = TensorType(DType.float64, [], device_ref)
    input_types = [flat, flat, flat, flat, *[scalar] * 7]

    def build(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, clip_scale):
        hyper = kernels.adamw_hyper(
            lr, beta1, beta2, eps, weight_decay, step, clip_scale, device=param.device
        )
        return kernels.adamw_fused(param, grad, m, v, hyper)

    return compile_graph(session, "adamw_test", input_types, build)


ADAMW_SETTINGS = [
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, clip_scale=1.0),
    dict(lr=3e-4, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, step=17, clip_scale=0.25),
]


@pytest.mark.parametrize("size", [*LENGTHS, 100_003])
@pytest.mark.parametrize("setting", range(len(ADAMW_SETTINGS)))
def test_adamw_matches_reference(adamw_model, device, size, setting):
    hyper = ADAMW_SETTINGS[setting]
    rng = np.random.default_rng(size + setting)
    param, grad, m = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    v = rng.uniform(0.0, 1.0, size).astype(np.float32)
    scalars = [np.array(hyper[key], dtype=np.float64) for key in
               ("lr", "beta1", "beta2", "eps", "weight_decay", "step", "clip_scale")]
    param_new, m_new, v_new = run(adamw_model, device, param, grad, m, v, *scalars)
    expected = reference.adamw_fused(*as64(param, grad, m, v), **hyper)
    assert_close(param_new, expected[0])
    assert_close(m_new, expected[1])
    assert_close(v_new, expected[2])


def test_adamw_reference_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    param = rng.standard_normal(1000).astype(np.float32)
    tensor = torch.tensor(param, requires_grad=True)
    optimizer = torch.optim.AdamW([tensor], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    m = np.zeros_like(param)
    v = np.zeros_like(param)
    for step in range(1, 4):
        grad = rng.standard_normal(1000).astype(np.float32)
        tensor.grad = torch.tensor(grad)
        optimizer.step()
        param, m, v = reference.adamw_fused(
            param, grad, m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=step
        )
    # Same operation order in float32: equal up to torch's fused multiply-adds.
    np.testing.assert_allclose(param, tensor.detach().numpy(), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# mha_single_query


MHA_CASES = [  # (B, n, H, dh)
    (1, 1, 1, 1),
    (2, 3, 4, 9),
    (1, 1000, 2, 32),
    (3, 59, 1, 64),
    (1, 224, 8, 9),
    (2, 98, 3, 1),
    (4, 96, 2, 512),
]


@pytest.fixture(scope="module")
def mha_model(session, device_ref):
    kv = f32(device_ref, "B", "n", "H", "dh")
    input_types = [f32(device_ref, "B", "H", "dh"), kv, kv]
    return compile_graph(session, "mha_test", input_types, lambda q, k, v: [kernels.mha_single_query(q, k, v)])


@pytest.mark.parametrize("batch,keys,heads,head_dim", MHA_CASES)
def test_mha_single_query_matches_reference(mha_model, device, batch, keys, heads, head_dim):
    rng = np.random.default_rng(keys + head_dim)
    q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, keys, heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, keys, heads, head_dim)).astype(np.float32)
    (output,) = run(mha_model, device, q, k, v)
    q64, k64, v64 = as64(q, k, v)
    # The output is a convex combination of v rows; scores carry a dh-term dot product error
    # that exp turns into a relative weight error, so the slack scales with max|v| * score error.
    score_error = 4 * np.sqrt(head_dim) * EPS32 * np.einsum("bhd,bnhd->bhn", np.abs(q64), np.abs(k64)).max()
    slack = (1e-5 + 2 * score_error / np.sqrt(head_dim)) * np.abs(v64).max()
    assert_close(output, reference.mha_single_query(q64, k64, v64), atol=slack, terms=keys,
                 abs_sum=np.abs(v64).max())


# --------------------------------------------------------------------------------------------
# Graph-side validation (no compile)


def test_graph_functions_check_dtypes():
    with Graph("checks", input_types=[TensorType(DType.float32, ["B", "K"], DeviceRef.CPU()),
                                      TensorType(DType.int32, ["K", "N"], DeviceRef.CPU())],
               custom_extensions=[kernels.kernel_library_path()]) as graph:
        x, w = (value.tensor for value in graph.inputs)
        with pytest.raises(TypeError, match="w must be float32 or bfloat16"):
            kernels.matvec(x, w)
        with pytest.raises(ValueError, match="rank 1"):
            kernels.adamw_fused(x, x, x, x, x)


def test_graph_without_library_is_rejected():
    with Graph("no_library", input_types=[TensorType(DType.float32, ["B", "K"], DeviceRef.CPU())]) as graph:
        x = graph.inputs[0].tensor
        with pytest.raises(RuntimeError, match="custom_extensions"):
            kernels.matvec(x, x)


def test_kernel_build_is_cached(tmp_path):
    from modgrad.kernels.build import build_kernels

    first = build_kernels(root=tmp_path)
    second = build_kernels(root=tmp_path)
    assert not first.cached
    assert second.cached
    assert first.path == second.path
    assert first.path.stat().st_size > 0
