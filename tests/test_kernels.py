"""The Mojo custom-op kernels against their numpy oracles.

Each kernel compiles into one MAX graph with symbolic dimensions, and that graph runs every
shape case. The cases use lengths 1, 3, 59, 96, 98, 224 and 1000, widths 1, 9, 32 and 512 and
memories 2, 4, 8 and 25, so the SIMD loops meet empty, scalar, odd and multi-vector tails.

Tolerances (float32 kernels, float64 oracles computed from the same float32 inputs):
elementwise results use rtol = atol = 1e-5. A result that sums n products gets an extra
absolute slack of 4 * sqrt(n) * eps32 * sum|terms|, the usual estimate of float32 summation
error, because the kernels sum in another order than the oracle (SIMD lanes, FMA). The
layer norm checks and matvec with K = 1000 add that slack.

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

from modgrad.graphs import kernels
from modgrad.engine.prims.attention import _single_query_backward_impl
from modgrad.engine.prims.norm import _layer_norm_backward_impl, _layer_norm_impl
from modgrad.kernels import adamw_hyper, reference

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
    (16, 3, 9),  # one block of 16 rows on an AVX-512 CPU, fewer pairs than a vector
    (16, 9, 3),  # fewer pairs than neurons, so the CPU backward takes rows one at a time
    (17, 33, 70),  # a block and one more row
    (37, 17, 1500),  # 55,500 (row, pair) elements, which the CPU backward splits over 3 tasks
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
    _, beta_new, sync = reference.sync_update(z, left, right, decay, alpha, beta)
    abs_total_alpha = np.abs(grad_alpha) + np.abs(grad_sync) / np.sqrt(beta_new)
    abs_total_beta = np.abs(grad_beta) + np.abs(grad_sync * sync) / (2 * beta_new)
    # d_z sums one term per pair end on the neuron; bound the count by all pair ends.
    abs_d_z = np.zeros_like(z)
    np.add.at(abs_d_z, (slice(None), left), abs_total_alpha * np.abs(z[:, right]))
    np.add.at(abs_d_z, (slice(None), right), abs_total_alpha * np.abs(z[:, left]))
    assert_close(d_z, expected[0], terms=2 * pairs, abs_sum=abs_d_z)
    abs_decay_terms = abs_total_alpha * np.abs(alpha) + abs_total_beta * np.abs(beta)
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
    (6, 9, 25, 32),  # a block of four rows plus two rows, and M one vector plus part of one
    (5, 3, 40, 16),  # H exactly one AVX-512 vector
    (16, 33, 32, 1),  # H below a vector, M whole vectors
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
    # pre sums M + 1 terms. The GLU passes the value's error on scaled by sigmoid <= 1 and
    # the gate's scaled by |value| * sigmoid' <= |value| / 4.
    value = reference.nlm_pre_activations(trace, weight, bias)[..., :hidden]
    assert_close(output, reference.nlm_forward(trace, weight, bias), terms=memory + 1,
                 abs_sum=abs_pre[..., :hidden] + np.abs(value) / 4 * abs_pre[..., hidden:])

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
        sliced = kernels.matvec(x, w, slices=3)  # K split into 3 ranges, some of them empty when K < 3
        return [kernels.matvec(x, w), kernels.matvec(x, w.cast(DType.bfloat16)), sliced]

    return compile_graph(session, "matvec_test", input_types, build)


@pytest.mark.parametrize("batch,inner,columns", MATVEC_CASES)
def test_matvec_matches_reference(matvec_model, device, batch, inner, columns):
    rng = np.random.default_rng(batch * inner + columns)
    x = rng.standard_normal((batch, inner)).astype(np.float32)
    w = rng.standard_normal((inner, columns)).astype(np.float32)
    y, y_bf16, y_sliced = run(matvec_model, device, x, w)
    x64, w64 = as64(x, w)
    abs_sum = np.abs(x64) @ np.abs(w64)
    assert_close(y, reference.matvec(x64, w64), terms=inner, abs_sum=abs_sum)
    assert_close(y_sliced, reference.matvec(x64, w64), terms=inner, abs_sum=abs_sum)
    # bfloat16 weights: the rounding of w is part of the oracle, the sum is float32.
    w_bf16 = round_to_bfloat16(w).astype(np.float64)
    assert_close(y_bf16, reference.matvec(x64, w_bf16), terms=inner, abs_sum=abs_sum)


def test_matvec_splits_a_static_inner_size(session, device, device_ref):
    inner, columns = 1000, 59  # 1000 // MATVEC_ROWS_PER_SLICE = 2 ranges by default
    assert min(kernels.MATVEC_MAX_SLICES, inner // kernels.MATVEC_ROWS_PER_SLICE) == 2
    model = compile_graph(session, "matvec_static_k", [f32(device_ref, "B", inner), f32(device_ref, inner, columns)],
                          lambda x, w: [kernels.matvec(x, w)])
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, inner)).astype(np.float32)
    w = rng.standard_normal((inner, columns)).astype(np.float32)
    (y,) = run(model, device, x, w)
    x64, w64 = as64(x, w)
    assert_close(y, reference.matvec(x64, w64), terms=inner, abs_sum=np.abs(x64) @ np.abs(w64))


# --------------------------------------------------------------------------------------------
# adamw_fused


@pytest.fixture(scope="module")
def adamw_model(session, device_ref):
    flat = f32(device_ref, "N")
    input_types = [flat, flat, flat, flat, f32(device_ref, 8)]
    return compile_graph(session, "adamw_test", input_types, lambda *v: kernels.adamw_fused(*v))


ADAMW_SETTINGS = [
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, clip_scale=1.0),
    dict(lr=3e-4, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, step=17, clip_scale=0.25),
]


@pytest.mark.parametrize("size", [*LENGTHS, 100_003])
@pytest.mark.parametrize("setting", range(len(ADAMW_SETTINGS)))
def test_adamw_matches_reference(adamw_model, device, size, setting):
    settings = ADAMW_SETTINGS[setting]
    rng = np.random.default_rng(size + setting)
    param, grad, m = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    v = rng.uniform(0.0, 1.0, size).astype(np.float32)
    hyper = adamw_hyper(**settings)
    param_new, m_new, v_new = run(adamw_model, device, param, grad, m, v, hyper)
    expected = reference.adamw_fused(*as64(param, grad, m, v), **settings)
    assert_close(param_new, expected[0])
    assert_close(m_new, expected[1])
    assert_close(v_new, expected[2])


def test_adamw_hyper_rejects_step_zero():
    with pytest.raises(ValueError, match="step must be >= 1"):
        adamw_hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=0)


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
    (8, 20, 14, 16),  # on a 2-core CPU each work item takes a whole row of 14 heads
    (1, 33, 70, 8),  # a row's 70 heads spread over work items
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
    # The output is a convex combination of v rows, so the float32 errors of the n-term sums
    # are relative to max|v|; the dh-term score dot products add a relative weight error.
    assert_close(output, reference.mha_single_query(q64, k64, v64), terms=keys + head_dim,
                 abs_sum=np.abs(v64).max(axis=1))


@pytest.fixture(scope="module")
def mha_backward_model(session, device_ref):
    q = f32(device_ref, "B", "H", "dh")
    kv = f32(device_ref, "B", "n", "H", "dh")
    return compile_graph(session, "mha_backward_test", [q, kv, kv, q],
                         lambda q, k, v, g: list(kernels.mha_single_query_backward(q, k, v, g)))


@pytest.mark.parametrize("batch,keys,heads,head_dim", MHA_CASES + [(16, 100, 8, 16), (2, 17, 3, 20)])
def test_mha_backward_matches_engine_gradient(mha_backward_model, device, batch, keys, heads, head_dim):
    rng = np.random.default_rng(keys + head_dim + 1)
    q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, keys, heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, keys, heads, head_dim)).astype(np.float32)
    grad = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
    d_q, d_k, d_v = run(mha_backward_model, device, q, k, v, grad)
    q64, k64, v64, g64 = as64(q, k, v, grad)
    want_q, want_k, want_v = _single_query_backward_impl(q64, k64, v64, g64)
    # The softmax weights p carry the error of the dh-term scores and the n-term sum, so every
    # result gets terms = n + dh. |dp_j| and |p . dp| are at most bound = sum|grad| max|v|, so
    # |ds_j| <= 2 bound / sqrt(dh), and d_q sums n terms ds_j k_j with weights p_j summing to 1.
    terms = keys + head_dim
    bound = np.abs(g64).sum(-1) * np.abs(v64).max(axis=(1, 3))  # (B, H)
    ds_bound = 2 * bound / np.sqrt(head_dim)
    assert_close(d_v, want_v, terms=terms, abs_sum=np.abs(g64)[:, None])
    assert_close(d_k, want_k, terms=terms, abs_sum=np.abs(q64)[:, None] * ds_bound[:, None, :, None])
    assert_close(d_q, want_q, terms=terms, abs_sum=ds_bound[..., None] * np.abs(k64).max(axis=1))


# --------------------------------------------------------------------------------------------
# trace_push


TRACE_CASES = [  # (R, M)
    (1, 1),
    (3, 2),
    (1, 25),
    (59, 25),  # rows split unevenly over the CPU tasks
    (8192, 25),  # the maze CTM's window: D 512 times B 16
    (7, 33),  # a row of two AVX-512 vectors and one more slot
    (1000, 4),
]


@pytest.fixture(scope="module")
def trace_model(session, device_ref):
    window = f32(device_ref, "R", "M")

    def build(trace, new, grad, other):
        pushed = kernels.trace_push(trace, new)
        return [pushed, *kernels.trace_push_backward(grad), *kernels.trace_push_backward(grad, other)]

    return compile_graph(session, "trace_test", [window, f32(device_ref, "R"), window, window], build)


@pytest.mark.parametrize("rows,slots", TRACE_CASES)
def test_trace_push_matches_reference(trace_model, device, rows, slots):
    rng = np.random.default_rng(rows + slots)
    trace, grad, other = (rng.standard_normal((rows, slots)).astype(np.float32) for _ in range(3))
    new = rng.standard_normal(rows).astype(np.float32)
    pushed, d_trace, d_new, d_trace_sum, d_new_sum = run(trace_model, device, trace, new, grad, other)
    # Copies and one float32 add per element, so the results are exact.
    np.testing.assert_array_equal(pushed, np.concatenate([trace[:, 1:], new[:, None]], axis=1))
    for total, got_trace, got_new in ((grad, d_trace, d_new), (grad + other, d_trace_sum, d_new_sum)):
        np.testing.assert_array_equal(got_trace, np.concatenate([np.zeros((rows, 1), np.float32), total[:, :-1]], 1))
        np.testing.assert_array_equal(got_new, total[:, -1])


# --------------------------------------------------------------------------------------------
# layer_norm and layer_norm_backward


LAYER_NORM_CASES = [  # (R, D)
    (1, 1),
    (3, 9),
    (16, 16),  # the U-Net synapse's narrowest layer at batch 16
    (16, 441),  # a row of 27 AVX-512 vectors and 9 more values
    (2, 15),  # a row shorter than one AVX-512 vector
    (16, 512),
    (59, 1000),  # 59,000 values: the rows split over the CPU tasks
    (1000, 33),
]


@pytest.fixture(scope="module")
def layer_norm_model(session, device_ref):
    rows, vector = f32(device_ref, "R", "D"), f32(device_ref, "D")

    def build(x, gamma, beta, grad):
        return [kernels.layer_norm(x, gamma, beta, 1e-5), kernels.layer_norm(x, gamma, beta, 1e-5, silu=True),
                *kernels.layer_norm_backward(x, gamma, grad, 1e-5),
                *kernels.layer_norm_backward(x, gamma, grad, 1e-5, beta=beta)]

    return compile_graph(session, "layer_norm_test", [rows, vector, vector, rows], build)


@pytest.mark.skipif(DEVICE != "cpu", reason="the layer norm kernels run on the CPU only")
@pytest.mark.parametrize("rows,size", LAYER_NORM_CASES)
def test_layer_norm_matches_engine(layer_norm_model, device, rows, size):
    rng = np.random.default_rng(rows * size)
    x = (rng.standard_normal((rows, size)) * 3 + 1).astype(np.float32)
    gamma, beta = (rng.standard_normal(size).astype(np.float32) for _ in range(2))
    grad = rng.standard_normal((rows, size)).astype(np.float32)
    y, y_silu, *backward = run(layer_norm_model, device, x, gamma, beta, grad)
    x64, gamma64, beta64, grad64 = as64(x, gamma, beta, grad)
    centred = x64 - x64.mean(-1, keepdims=True)
    inv_std = 1 / np.sqrt((centred * centred).mean(-1, keepdims=True) + 1e-5)
    x_hat = centred * inv_std
    # x_hat comes from two sums over the row, whose rounding error scales with |x - mean| * inv_std.
    hat_slack = (np.abs(x_hat) + 1) * np.abs(gamma64)
    for activation, got in (("none", y), ("silu", y_silu)):
        (want,) = _layer_norm_impl(x64, gamma64, beta64, eps=1e-5, activation=activation)
        assert_close(got, want, terms=size, abs_sum=hat_slack)
    for activation, (d_x, d_gamma, d_beta) in (("none", backward[:3]), ("silu", backward[3:])):
        extra = (beta64,) if activation == "silu" else ()
        want_x, want_gamma, want_beta = _layer_norm_backward_impl(x64, gamma64, grad64, *extra, eps=1e-5,
                                                                  activation=activation)
        g = grad64 if activation == "none" else _silu_grad_on_y(x_hat, gamma64, beta64, grad64)
        d_hat = g * gamma64
        # d_x sums d_hat and d_hat * x_hat over the row, and x_hat itself comes from sums over the row.
        row_terms = inv_std * (np.abs(d_hat).mean(-1, keepdims=True)
                               + (1 + np.abs(x_hat)) * np.abs(d_hat * x_hat).mean(-1, keepdims=True))
        assert_close(d_x, want_x, terms=size, abs_sum=row_terms + np.abs(d_hat) * inv_std)
        assert_close(d_gamma, want_gamma, terms=rows * size, abs_sum=np.abs(g * x_hat).sum(0) + np.abs(g).sum(0))
        assert_close(d_beta, want_beta, terms=rows * size, abs_sum=np.abs(g).sum(0))


def _silu_grad_on_y(x_hat, gamma, beta, grad):
    y = x_hat * gamma + beta
    s = 1 / (1 + np.exp(-y))
    return grad * s * (1 + y * (1 - s))


# --------------------------------------------------------------------------------------------
# decode_attention


DECODE_CASES = [  # (B, L, H, H_kv, dh)
    (1, 0, 1, 1, 1),  # an empty cache: the new token alone
    (2, 3, 4, 2, 9),
    (1, 1000, 14, 2, 64),  # Qwen2.5-0.5B's heads
    (3, 59, 6, 1, 32),
    (2, 98, 8, 8, 3),
    (4, 224, 7, 7, 1),
    (1, 96, 70, 10, 8),  # a row's 70 heads spread over work items
]


@pytest.fixture(scope="module")
def decode_model(session, device_ref):
    new = f32(device_ref, "B", "Hkv", "dh")
    cache = f32(device_ref, "L", "B", "Hkv", "dh")
    input_types = [f32(device_ref, "B", "H", "dh"), new, new, cache, cache]
    return compile_graph(session, "decode_test", input_types, lambda *xs: [kernels.decode_attention(*xs)])


@pytest.mark.parametrize("batch,cached,heads,kv_heads,head_dim", DECODE_CASES)
def test_decode_attention_matches_reference(decode_model, device, batch, cached, heads, kv_heads, head_dim):
    rng = np.random.default_rng(cached + head_dim)
    q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    past_k, past_v = (rng.standard_normal((cached, batch, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    (output,) = run(decode_model, device, q, k, v, past_k, past_v)
    inputs64 = as64(q, k, v, past_k, past_v)
    value_scale = np.maximum(np.abs(inputs64[2]).max(axis=1), np.abs(inputs64[4]).max(axis=(0, 2), initial=0.0))  # (B, dh)
    assert_close(output, reference.decode_attention(*inputs64), terms=cached + 1 + head_dim,
                 abs_sum=value_scale[:, None, :])


def test_decode_attention_rejects_ungrouped_heads(decode_model, device):
    q = np.zeros((1, 3, 4), np.float32)
    new = np.zeros((1, 2, 4), np.float32)
    cache = np.zeros((5, 1, 2, 4), np.float32)
    with pytest.raises(Exception, match="not a multiple"):
        run(decode_model, device, q, new, new, cache, cache)


# --------------------------------------------------------------------------------------------
# causal_attention


CAUSAL_CASES = [  # (B, T, H, H_kv, dh, positions)
    (1, 1, 1, 1, 1, "arange"),
    (2, 3, 4, 2, 9, "arange"),
    (1, 224, 14, 2, 64, "arange"),  # Qwen2.5-0.5B's heads
    (3, 59, 6, 1, 32, "arange"),
    (2, 98, 8, 8, 3, "shuffled"),  # positions in no order: visibility follows the positions
    (1, 96, 70, 10, 8, "repeated"),  # tied positions attend to each other
]


def case_positions(kind: str, tokens: int, rng) -> np.ndarray:
    if kind == "shuffled":
        return rng.permutation(tokens).astype(np.int64)
    if kind == "repeated":
        return (np.arange(tokens) // 3).astype(np.int64)
    return np.arange(tokens, dtype=np.int64)


@pytest.fixture(scope="module")
def causal_model(session, device_ref):
    kv = f32(device_ref, "B", "T", "Hkv", "dh")
    positions = TensorType(DType.int64, ["T"], device_ref)
    input_types = [f32(device_ref, "B", "T", "H", "dh"), kv, kv, positions]
    return compile_graph(session, "causal_test", input_types, lambda *xs: [kernels.causal_attention(*xs)])


@pytest.mark.parametrize("batch,tokens,heads,kv_heads,head_dim,kind", CAUSAL_CASES)
def test_causal_attention_matches_reference(causal_model, device, batch, tokens, heads, kv_heads, head_dim, kind):
    rng = np.random.default_rng(tokens + head_dim)
    q = rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, tokens, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    positions = case_positions(kind, tokens, rng)
    (output,) = run(causal_model, device, q, k, v, positions)
    q64, k64, v64 = as64(q, k, v)
    value_scale = np.abs(v64).max(axis=(1, 2))  # (B, dh)
    assert_close(output, reference.causal_attention(q64, k64, v64, positions), terms=tokens + head_dim,
                 abs_sum=value_scale[:, None, None, :])


# --------------------------------------------------------------------------------------------
# torch bridge


@pytest.mark.skipif(DEVICE != "cpu", reason="the installed torch is CPU-only")
def test_torch_bridge_sync_update_on_cpu():
    torch = pytest.importorskip("torch")
    from modgrad.kernels import torch_bridge

    rng = np.random.default_rng(7)
    for batch, neurons, pairs in [(2, 9, 59), (3, 512, 1000)]:  # one compiled graph serves both
        inputs = sync_inputs(rng, batch, neurons, pairs)[:6]
        outputs = torch_bridge.sync_update(*(torch.from_numpy(array) for array in inputs))
        expected = reference.sync_update(*as64(*inputs))
        for output, oracle in zip(outputs, expected):
            assert output.dtype == torch.float32
            assert_close(output.numpy(), oracle)


@pytest.mark.skipif(DEVICE != "cpu", reason="the installed torch is CPU-only")
def test_torch_bridge_decode_attention_on_cpu():
    torch = pytest.importorskip("torch")
    from modgrad.kernels import torch_bridge

    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 14, 64)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 2, 64)).astype(np.float32)
    past_k, past_v = rng.standard_normal((2, 37, 2, 2, 64)).astype(np.float32)
    inputs = (q, k, v, past_k, past_v)
    output = torch_bridge.decode_attention(*(torch.from_numpy(array) for array in inputs))
    assert output.dtype == torch.float32
    assert_close(output.numpy(), reference.decode_attention(*as64(*inputs)), terms=38 + 64,
                 abs_sum=np.abs(np.concatenate([past_v.reshape(-1), v.reshape(-1)])).max())


@pytest.mark.skipif(DEVICE != "cpu", reason="the installed torch is CPU-only")
def test_torch_bridge_causal_attention_on_cpu():
    torch = pytest.importorskip("torch")
    from modgrad.kernels import torch_bridge

    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 17, 14, 64)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 17, 2, 64)).astype(np.float32)
    positions = np.arange(17, dtype=np.int64)
    output = torch_bridge.causal_attention(*(torch.from_numpy(array) for array in (q, k, v, positions)))
    assert output.dtype == torch.float32
    assert_close(output.numpy(), reference.causal_attention(*as64(q, k, v), positions), terms=17 + 64,
                 abs_sum=np.abs(v).max())


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


# --------------------------------------------------------------------------------------------
# GPU code generation without a GPU

# Instantiates every op's `execute["gpu"]` on tiny tensors, so that `mojo build
# --target-accelerator` generates device code for each kernel; nothing is run.
GPU_COMPILE_CHECK = """
from extensibility import InputTensor, OutputTensor, StaticTensorSpec
from max.gpu.host import DeviceContext
from std.utils import IndexList
from mojo_kernels.adamw import AdamwFused
from mojo_kernels.attention import MhaSingleQuery
from mojo_kernels.matvec import Matvec
from mojo_kernels.nlm import NlmBackward, NlmForward
from mojo_kernels.sync_update import SyncUpdate, SyncUpdateBackward


def main() raises:
    var ctx = DeviceContext()
    var floats = ctx.enqueue_create_buffer[DType.float32](64)
    var halves = ctx.enqueue_create_buffer[DType.bfloat16](64)
    var ints = ctx.enqueue_create_buffer[DType.int32](64)
    var p = floats.unsafe_ptr()
    comptime f1 = StaticTensorSpec[DType.float32, 1].get_unknown()
    comptime f2 = StaticTensorSpec[DType.float32, 2].get_unknown()
    comptime f3 = StaticTensorSpec[DType.float32, 3].get_unknown()
    comptime f4 = StaticTensorSpec[DType.float32, 4].get_unknown()
    comptime h2 = StaticTensorSpec[DType.bfloat16, 2].get_unknown()
    comptime i1 = StaticTensorSpec[DType.int32, 1].get_unknown()
    var o1 = OutputTensor[static_spec=f1](p, IndexList[1](4))
    var o2 = OutputTensor[static_spec=f2](p, IndexList[2](2, 2))
    var o3 = OutputTensor[static_spec=f3](p, IndexList[3](1, 2, 2))
    var x1 = InputTensor[static_spec=f1](p, IndexList[1](4))
    var x2 = InputTensor[static_spec=f2](p, IndexList[2](2, 2))
    var x3 = InputTensor[static_spec=f3](p, IndexList[3](1, 2, 2))
    var x4 = InputTensor[static_spec=f4](p, IndexList[4](1, 1, 2, 2))
    var w2 = InputTensor[static_spec=h2](halves.unsafe_ptr(), IndexList[2](2, 2))
    var xi = InputTensor[static_spec=i1](ints.unsafe_ptr(), IndexList[1](4))
    SyncUpdate.execute["gpu"](o2, o2, o2, x2, xi, xi, x1, x2, x2, ctx)
    SyncUpdateBackward.execute["gpu"](o2, o1, o2, o2, x2, xi, xi, x1, x2, x2, x2, x2, x2, ctx)
    NlmForward.execute["gpu"](o3, x3, x3, x2, ctx)
    NlmBackward.execute["gpu"](o3, o3, o2, o3, x3, x3, x2, x3, ctx)
    Matvec.execute["gpu"](o3, x2, x2, ctx)
    Matvec.execute["gpu"](o3, x2, w2, ctx)
    AdamwFused.execute["gpu"](o1, o1, o1, x1, x1, x1, x1, x1, ctx)
    MhaSingleQuery.execute["gpu"](o3, x3, x4, x4, ctx)
"""


@pytest.mark.slow
@pytest.mark.parametrize("accelerator", ["sm_90", "gfx942"])  # NVIDIA H100/H200, AMD MI300
def test_kernels_generate_gpu_code(tmp_path, accelerator):
    import subprocess

    from modgrad.kernels.build import build_kernels, mojo_executable

    package = build_kernels().path
    (tmp_path / "check.mojo").write_text(GPU_COMPILE_CHECK)
    env = dict(os.environ, MODULAR_CACHE_DIR=str(tmp_path / "mojo-cache"))
    command = [mojo_executable(), "build", f"--target-accelerator={accelerator}", "-I", str(package.parent),
               "--emit", "asm", "-o", str(tmp_path / "check.s"), str(tmp_path / "check.mojo")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    device_files = [path for path in tmp_path.iterdir() if path.suffix in (".ptx", ".amdgcn", ".s", ".hsaco")
                    and path.name != "check.s"]
    assert len(device_files) >= 8, sorted(path.name for path in tmp_path.iterdir())
