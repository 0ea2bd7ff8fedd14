"""Neuron-level models: one small GLU network per neuron over its trace window.

For batch row b, neuron d and hidden unit h, with O = 2H pre-activations per neuron:

    pre[b, d, o] = bias[d, o] + sum_m trace[b, d, m] * weight[d, m, o]
    out[b, d, h] = pre[b, d, h] * sigmoid(pre[b, d, H + h])

The backward pass recomputes `pre` instead of storing it.

Two layouts of the per-row tensors (trace, output and their gradients) are
registered: batch-major `nlm_forward` / `nlm_backward` take trace (B, D, M),
and `nlm_forward_neuron_major` / `nlm_backward_neuron_major` take trace
(D, B, M) and return (D, B, H), the layout the CTM stores its trace in.
Transposing around the batch-major ops instead added about 1 ms to a
forward call at B 16, D 512, M 25, H 32 on a shared 2-core x86-64 CPU,
more than the forward kernel itself takes there.
"""

from extensibility import (
    InputTensor,
    ManagedTensorSlice,
    OutputTensor,
    foreach,
    get_kernel_simd_width,
    register,
)
from layout import Coord
from max.algorithm.functional import elementwise, sync_parallelize
from max.gpu.host import DeviceContext
from std.math import ceildiv, exp
from max.runtime.asyncrt import parallelism_level

from .checks import check_dense, check_dim
from .host import host_context


@always_inline
def _sigmoid[width: Int](x: SIMD[DType.float32, width]) -> SIMD[DType.float32, width]:
    return 1 / (1 + exp(-x))


@always_inline
def _row[neuron_major: Bool](b: Int, d: Int, batch: Int, neurons: Int) -> Int:
    """Return the flat index of (batch row b, neuron d) in a per-row tensor."""
    comptime if neuron_major:
        return d * batch + b
    else:
        return b * neurons + d


def _cpu_tasks(neurons: Int, ctx: DeviceContext) -> Int:
    """Return how many tasks split the neurons on the CPU.

    `elementwise` gives each thread at least 32768 work items (MAX 26.7), so
    over D <= 32768 neurons it would use one thread. Eight tasks per thread
    keep the threads balanced when other work shares the cores.
    """
    return max(1, min(neurons, 8 * parallelism_level(host_context(ctx))))


@always_inline
def _pre_activations[
    width: Int
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    memory: Int,
    hidden: Int,
    row: Int,
    d: Int,
    h: Int,
) -> Tuple[SIMD[DType.float32, width], SIMD[DType.float32, width]]:
    """Return the value and gate pre-activations of `width` hidden units from h.

    `row` is the flat index of the (batch row, neuron) pair, see `_row`.
    """
    var outputs = 2 * hidden
    var value = bias.unsafe_load[width=width](d * outputs + h)
    var gate = bias.unsafe_load[width=width](d * outputs + hidden + h)
    var trace_row = row * memory
    var weight_row = d * memory * outputs
    for m in range(memory):
        var t = SIMD[DType.float32, width](trace[unsafe_offset=trace_row + m])
        var w = weight_row + m * outputs + h
        value = t.fma(weight.unsafe_load[width=width](w), value)
        gate = t.fma(weight.unsafe_load[width=width](w + hidden), gate)
    return (value, gate)


def _check_nlm_shapes[
    neuron_major: Bool
](
    op: StaticString,
    trace: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    weight: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    bias: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
) raises:
    var neurons = trace.dim_size(0 if neuron_major else 1)
    var memory = trace.dim_size(2)
    var outputs = weight.dim_size(2)
    if outputs % 2 != 0:
        raise Error(
            op, ": weight has ", outputs,
            " outputs per neuron; GLU needs an even number",
        )
    check_dim(op, "weight", weight, 0, neurons)
    check_dim(op, "weight", weight, 1, memory)
    check_dim(op, "bias", bias, 0, neurons)
    check_dim(op, "bias", bias, 1, outputs)
    check_dense(op, "trace", trace)
    check_dense(op, "weight", weight)
    check_dense(op, "bias", bias)


def _check_rows[
    neuron_major: Bool
](
    op: StaticString,
    name: StaticString,
    t: ManagedTensorSlice,
    batch: Int,
    neurons: Int,
    width: Int,
) raises:
    """Raise unless `t` is a packed per-row tensor of `width` values per row."""
    check_dim(op, name, t, 0, neurons if neuron_major else batch)
    check_dim(op, name, t, 1, batch if neuron_major else neurons)
    check_dim(op, name, t, 2, width)
    check_dense(op, name, t)


def _nlm_forward[
    target: StaticString, neuron_major: Bool
](
    op: StaticString,
    output: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
    trace: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    weight: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    bias: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
    ctx: DeviceContext,
) raises:
    _check_nlm_shapes[neuron_major](op, trace, weight, bias)
    var batch = trace.dim_size(1 if neuron_major else 0)
    var neurons = trace.dim_size(0 if neuron_major else 1)
    var memory = trace.dim_size(2)
    var hidden = weight.dim_size(2) // 2
    _check_rows[neuron_major](op, "output", output, batch, neurons, hidden)
    var tp = trace.unsafe_ptr()
    var wp = weight.unsafe_ptr()
    var bp = bias.unsafe_ptr()

    def glu[
        width: Int
    ](idx: Coord[...]) {
        var tp, var wp, var bp, var memory, var hidden, var batch, var neurons,
    } -> SIMD[DType.float32, width]:
        var outer = Int(idx[0].value())
        var inner = Int(idx[1].value())
        var b = inner if neuron_major else outer
        var d = outer if neuron_major else inner
        var pre = _pre_activations[width](
            tp, wp, bp, memory, hidden, _row[neuron_major](b, d, batch, neurons),
            d, Int(idx[2].value()),
        )
        return pre[0] * _sigmoid(pre[1])

    comptime if target == "cpu":
        var out = output.unsafe_ptr()
        var tasks = _cpu_tasks(neurons, ctx)
        var chunk = ceildiv(neurons, tasks)

        def neuron_outputs(task: Int) {
            var tp, var wp, var bp, var out, var memory, var hidden, var batch,
            var neurons, var chunk,
        }:
            for d in range(task * chunk, min((task + 1) * chunk, neurons)):
                _neuron_forward[get_kernel_simd_width[DType.float32, target](), neuron_major](
                    tp, wp, bp, out, batch, neurons, memory, hidden, d
                )

        sync_parallelize(neuron_outputs, tasks, host_context(ctx))
    else:
        foreach[target=target](glu, output, ctx)


@register("nlm_forward")
struct NlmForward:
    """`out` (B, D, H) from trace (B, D, M)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        trace: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        weight: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        bias: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _nlm_forward[target, False](
            "nlm_forward", output, trace, weight, bias, ctx
        )


@register("nlm_forward_neuron_major")
struct NlmForwardNeuronMajor:
    """`out` (D, B, H) from trace (D, B, M)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        trace: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        weight: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        bias: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _nlm_forward[target, True](
            "nlm_forward_neuron_major", output, trace, weight, bias, ctx
        )


def _nlm_backward[
    target: StaticString, neuron_major: Bool
](
    op: StaticString,
    d_trace: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
    d_weight: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
    d_bias: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
    d_pre: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
    trace: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    weight: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    bias: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
    grad_output: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    ctx: DeviceContext,
) raises:
    """Write the gradients of `nlm_forward` given the gradient on its output.

    `d_pre`, the gradient on the pre-activations with 2H values per row, is
    an output too, written first and read by the three contractions. On the
    CPU each task takes a run of neurons and does all four steps for every
    batch row in turn, so that a neuron's weights and weight gradient stay in
    L1 and each d_pre row is used right after it is written. On a GPU, one
    thread per output element runs each step as its own pass over the batch.
    """
    _check_nlm_shapes[neuron_major](op, trace, weight, bias)
    var batch = trace.dim_size(1 if neuron_major else 0)
    var neurons = trace.dim_size(0 if neuron_major else 1)
    var memory = trace.dim_size(2)
    var outputs = weight.dim_size(2)
    var hidden = outputs // 2
    _check_rows[neuron_major](op, "grad_output", grad_output, batch, neurons, hidden)
    _check_rows[neuron_major](op, "d_pre", d_pre, batch, neurons, outputs)
    _check_rows[neuron_major](op, "d_trace", d_trace, batch, neurons, memory)
    var tp = trace.unsafe_ptr()
    var wp = weight.unsafe_ptr()
    var bp = bias.unsafe_ptr()
    var gp = grad_output.unsafe_ptr()
    var dp = d_pre.unsafe_ptr()
    comptime width = get_kernel_simd_width[DType.float32, target]()

    def pre_grads[
        width: Int, alignment: Int = 1
    ](idx: Coord[...]) {
        var tp, var wp, var bp, var gp, var dp, var memory, var hidden,
        var batch, var neurons,
    }:
        var b = Int(idx[0].value())
        var d = Int(idx[1].value())
        var row = _row[neuron_major](b, d, batch, neurons)
        _pre_grads[width](
            tp, wp, bp, gp, dp, memory, hidden, row, d, Int(idx[2].value())
        )

    # One work item per trace element: a dot product over the 2H outputs.
    def trace_grads[
        width: Int
    ](idx: Coord[...]) {
        var wp, var dp, var outputs, var memory, var batch, var neurons,
    } -> SIMD[DType.float32, width]:
        var outer = Int(idx[0].value())
        var inner = Int(idx[1].value())
        var b = inner if neuron_major else outer
        var d = outer if neuron_major else inner
        var m = Int(idx[2].value())
        var w_row = (d * memory + m) * outputs
        var g_row = _row[neuron_major](b, d, batch, neurons) * outputs
        return _dot[width](wp, w_row, dp, g_row, outputs)

    def weight_grads[
        width: Int
    ](idx: Coord[...]) {
        var tp, var dp, var batch, var neurons, var memory, var outputs,
    } -> SIMD[DType.float32, width]:
        var d = Int(idx[0].value())
        var m = Int(idx[1].value())
        var o = Int(idx[2].value())
        var acc = SIMD[DType.float32, width](0)
        for b in range(batch):
            var row = _row[neuron_major](b, d, batch, neurons)
            var t = SIMD[DType.float32, width](tp[unsafe_offset=row * memory + m])
            acc = t.fma(dp.unsafe_load[width=width](row * outputs + o), acc)
        return acc

    def bias_grads[
        width: Int
    ](idx: Coord[...]) {
        var dp, var batch, var neurons, var outputs,
    } -> SIMD[DType.float32, width]:
        var d = Int(idx[0].value())
        var o = Int(idx[1].value())
        var acc = SIMD[DType.float32, width](0)
        for b in range(batch):
            var row = _row[neuron_major](b, d, batch, neurons)
            acc += dp.unsafe_load[width=width](row * outputs + o)
        return acc

    comptime if target == "cpu":
        var xp = d_trace.unsafe_ptr()
        var dwp = d_weight.unsafe_ptr()
        var dbp = d_bias.unsafe_ptr()

        var tasks = _cpu_tasks(neurons, ctx)
        var chunk = ceildiv(neurons, tasks)

        def neuron_grads(task: Int) {
            var tp, var wp, var bp, var gp, var dp, var xp, var dwp,
            var dbp, var batch, var neurons, var memory, var hidden, var chunk,
        }:
            for d in range(task * chunk, min((task + 1) * chunk, neurons)):
                _neuron_backward[width, neuron_major](
                    tp, wp, bp, gp, dp, xp, dwp, dbp, batch, neurons, memory,
                    hidden, d,
                )

        sync_parallelize(neuron_grads, tasks, host_context(ctx))
    else:
        elementwise[simd_width=width, target=target](
            pre_grads, Coord(batch, neurons, hidden), ctx
        )
        foreach[target=target, simd_width=1](trace_grads, d_trace, ctx)
        foreach[target=target](weight_grads, d_weight, ctx)
        foreach[target=target](bias_grads, d_bias, ctx)


@register("nlm_backward")
struct NlmBackward:
    """`(d_trace, d_weight, d_bias, d_pre)` with trace (B, D, M)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        d_trace: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        d_weight: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        d_bias: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        d_pre: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        trace: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        weight: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        bias: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        grad_output: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _nlm_backward[target, False](
            "nlm_backward", d_trace, d_weight, d_bias, d_pre, trace, weight,
            bias, grad_output, ctx,
        )


@register("nlm_backward_neuron_major")
struct NlmBackwardNeuronMajor:
    """`(d_trace, d_weight, d_bias, d_pre)` with trace (D, B, M)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        d_trace: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        d_weight: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        d_bias: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        d_pre: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        trace: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        weight: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        bias: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        grad_output: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _nlm_backward[target, True](
            "nlm_backward_neuron_major", d_trace, d_weight, d_bias, d_pre,
            trace, weight, bias, grad_output, ctx,
        )


@always_inline
def _glu_store[
    width: Int, neuron_major: Bool
](
    output: Pointer[mut=True, Float32, _],
    value: SIMD[DType.float32, width],
    gate: SIMD[DType.float32, width],
    batch: Int,
    neurons: Int,
    hidden: Int,
    b: Int,
    d: Int,
    h: Int,
):
    var row = _row[neuron_major](b, d, batch, neurons)
    output.unsafe_store(row * hidden + h, value * _sigmoid(gate))


@always_inline
def _glu_four_rows[
    width: Int, neuron_major: Bool
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    output: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    hidden: Int,
    b: Int,
    d: Int,
    h: Int,
):
    """Write `width` hidden units from h of batch rows b to b + 3 of neuron d.

    Each weight vector loaded serves four rows, so the loop does eight FMAs
    per two vector loads instead of two.
    """
    var outputs = 2 * hidden
    var v0 = bias.unsafe_load[width=width](d * outputs + h)
    var g0 = bias.unsafe_load[width=width](d * outputs + hidden + h)
    var v1 = v0
    var v2 = v0
    var v3 = v0
    var g1 = g0
    var g2 = g0
    var g3 = g0
    var t0 = _row[neuron_major](b, d, batch, neurons) * memory
    var t1 = _row[neuron_major](b + 1, d, batch, neurons) * memory
    var t2 = _row[neuron_major](b + 2, d, batch, neurons) * memory
    var t3 = _row[neuron_major](b + 3, d, batch, neurons) * memory
    var weight_row = d * memory * outputs
    for m in range(memory):
        var w = weight_row + m * outputs + h
        var w_value = weight.unsafe_load[width=width](w)
        var w_gate = weight.unsafe_load[width=width](w + hidden)
        var x0 = SIMD[DType.float32, width](trace[unsafe_offset=t0 + m])
        var x1 = SIMD[DType.float32, width](trace[unsafe_offset=t1 + m])
        var x2 = SIMD[DType.float32, width](trace[unsafe_offset=t2 + m])
        var x3 = SIMD[DType.float32, width](trace[unsafe_offset=t3 + m])
        v0 = x0.fma(w_value, v0)
        g0 = x0.fma(w_gate, g0)
        v1 = x1.fma(w_value, v1)
        g1 = x1.fma(w_gate, g1)
        v2 = x2.fma(w_value, v2)
        g2 = x2.fma(w_gate, g2)
        v3 = x3.fma(w_value, v3)
        g3 = x3.fma(w_gate, g3)
    _glu_store[width, neuron_major](output, v0, g0, batch, neurons, hidden, b, d, h)
    _glu_store[width, neuron_major](output, v1, g1, batch, neurons, hidden, b + 1, d, h)
    _glu_store[width, neuron_major](output, v2, g2, batch, neurons, hidden, b + 2, d, h)
    _glu_store[width, neuron_major](output, v3, g3, batch, neurons, hidden, b + 3, d, h)


@always_inline
def _glu_one_row[
    width: Int, neuron_major: Bool
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    output: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    hidden: Int,
    b: Int,
    d: Int,
    h: Int,
):
    var row = _row[neuron_major](b, d, batch, neurons)
    var pre = _pre_activations[width](trace, weight, bias, memory, hidden, row, d, h)
    _glu_store[width, neuron_major](output, pre[0], pre[1], batch, neurons, hidden, b, d, h)


@always_inline
def _neuron_forward[
    width: Int, neuron_major: Bool
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    output: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    hidden: Int,
    d: Int,
):
    """Write the outputs of neuron d for every batch row, four rows at a time."""
    var row_stop = batch // 4 * 4
    var vector_stop = hidden // width * width
    for h in range(0, vector_stop, width):
        for b in range(0, row_stop, 4):
            _glu_four_rows[width, neuron_major](
                trace, weight, bias, output, batch, neurons, memory, hidden, b, d, h
            )
        for b in range(row_stop, batch):
            _glu_one_row[width, neuron_major](
                trace, weight, bias, output, batch, neurons, memory, hidden, b, d, h
            )
    for h in range(vector_stop, hidden):
        for b in range(0, row_stop, 4):
            _glu_four_rows[1, neuron_major](
                trace, weight, bias, output, batch, neurons, memory, hidden, b, d, h
            )
        for b in range(row_stop, batch):
            _glu_one_row[1, neuron_major](
                trace, weight, bias, output, batch, neurons, memory, hidden, b, d, h
            )


@always_inline
def _dot[
    width: Int
](
    a: Pointer[Float32, _], a_start: Int, b: Pointer[Float32, _], b_start: Int, size: Int
) -> SIMD[DType.float32, width]:
    """Return the dot product of two float32 runs, broadcast to `width` lanes."""
    comptime vector = 8
    var acc = SIMD[DType.float32, vector](0)
    var i = 0
    while i + vector <= size:
        acc = a.unsafe_load[width=vector](a_start + i).fma(
            b.unsafe_load[width=vector](b_start + i), acc
        )
        i += vector
    var total = acc.reduce_add()
    while i < size:
        total += a[unsafe_offset=a_start + i] * b[unsafe_offset=b_start + i]
        i += 1
    return SIMD[DType.float32, width](total)


@always_inline
def _axpy[
    width: Int
](
    dst: Pointer[mut=True, Float32, _],
    dst_start: Int,
    src: Pointer[Float32, _],
    src_start: Int,
    scale: Float32,
    size: Int,
):
    """Add scale * src to dst over `size` float32 elements."""
    var i = 0
    while i + width <= size:
        var d = dst.unsafe_load[width=width](dst_start + i)
        var x = src.unsafe_load[width=width](src_start + i)
        dst.unsafe_store(dst_start + i, SIMD[DType.float32, width](scale).fma(x, d))
        i += width
    while i < size:
        dst[unsafe_offset=dst_start + i] = scale.fma(
            src[unsafe_offset=src_start + i], dst[unsafe_offset=dst_start + i]
        )
        i += 1


@always_inline
def _pre_grads[
    width: Int
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    grad_output: Pointer[Float32, _],
    d_pre: Pointer[mut=True, Float32, _],
    memory: Int,
    hidden: Int,
    row: Int,
    d: Int,
    h: Int,
):
    """Write d_pre of one row for `width` value units from h and their gates."""
    var pre = _pre_activations[width](trace, weight, bias, memory, hidden, row, d, h)
    var gate = _sigmoid(pre[1])
    var grad = grad_output.unsafe_load[width=width](row * hidden + h)
    var pre_row = row * 2 * hidden
    d_pre.unsafe_store(pre_row + h, grad * gate)
    d_pre.unsafe_store(pre_row + hidden + h, grad * pre[0] * gate * (1 - gate))


@always_inline
def _neuron_backward[
    width: Int, neuron_major: Bool
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    grad_output: Pointer[Float32, _],
    d_pre: Pointer[mut=True, Float32, _],
    d_trace: Pointer[mut=True, Float32, _],
    d_weight: Pointer[mut=True, Float32, _],
    d_bias: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    hidden: Int,
    d: Int,
):
    """Write every gradient of neuron d, looping over the batch rows in order."""
    var outputs = 2 * hidden
    var weight_row = d * memory * outputs
    for i in range(memory * outputs):
        d_weight[unsafe_offset=weight_row + i] = 0
    for o in range(outputs):
        d_bias[unsafe_offset=d * outputs + o] = 0
    var vector_stop = hidden // width * width
    for b in range(batch):
        var row = _row[neuron_major](b, d, batch, neurons)
        for h in range(0, vector_stop, width):
            _pre_grads[width](
                trace, weight, bias, grad_output, d_pre, memory, hidden, row, d, h
            )
        for h in range(vector_stop, hidden):
            _pre_grads[1](
                trace, weight, bias, grad_output, d_pre, memory, hidden, row, d, h
            )
        var pre_row = row * outputs
        var trace_row = row * memory
        for m in range(memory):
            var w_row = weight_row + m * outputs
            d_trace[unsafe_offset=trace_row + m] = _dot[1](
                weight, w_row, d_pre, pre_row, outputs
            )[0]
            _axpy[width](
                d_weight, w_row, d_pre, pre_row, trace[unsafe_offset=trace_row + m],
                outputs,
            )
        _axpy[width](d_bias, d * outputs, d_pre, pre_row, 1, outputs)
