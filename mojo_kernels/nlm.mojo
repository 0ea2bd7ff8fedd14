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
                # The trace stands in for grad_output, which the forward does not read.
                _neuron_rows[get_kernel_simd_width[DType.float32, target](), neuron_major, False](
                    tp, wp, bp, tp, out, batch, neurons, memory, hidden, d
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
    CPU each task takes a run of neurons and does every step of one neuron
    before the next (`_neuron_backward`), so that the neuron's weights, their
    transpose and its d_pre rows stay in L1. On a GPU, one thread per output
    element runs each step as its own pass over the batch.
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
        var scratch_size = _backward_scratch(memory, hidden, width)
        # Left uninitialised: `_neuron_backward` writes every float before reading it.
        var scratches = List[Float32](capacity=tasks * scratch_size)
        var scratch_base = scratches.unsafe_ptr()

        def neuron_grads(task: Int) {
            var tp, var wp, var bp, var gp, var dp, var xp, var dwp,
            var dbp, var scratch_base, var scratch_size, var batch, var neurons,
            var memory, var hidden, var chunk,
        }:
            var scratch = scratch_base.unsafe_offset(task * scratch_size)
            for d in range(task * chunk, min((task + 1) * chunk, neurons)):
                _neuron_backward[width, neuron_major](
                    tp, wp, bp, gp, dp, xp, dwp, dbp, scratch, batch, neurons,
                    memory, hidden, d,
                )

        sync_parallelize(neuron_grads, tasks, host_context(ctx))
        _ = scratches^  # the list lives until every task has finished
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
    width: Int, backward: Bool
](
    output: Pointer[mut=True, Float32, _],
    grad_output: Pointer[Float32, _],
    value: SIMD[DType.float32, width],
    gate: SIMD[DType.float32, width],
    hidden: Int,
    row: Int,
    h: Int,
):
    """Store the GLU of `width` hidden units from h of one row, or their d_pre.

    Forward: `output` is the (rows, H) GLU output and `grad_output` is unused.
    Backward: `output` is d_pre, (rows, 2H), from `grad_output` (rows, H).
    """
    var sigmoid = _sigmoid(gate)
    comptime if backward:
        var grad = grad_output.unsafe_load[width=width](row * hidden + h)
        var pre_row = row * 2 * hidden
        output.unsafe_store(pre_row + h, grad * sigmoid)
        output.unsafe_store(pre_row + hidden + h, grad * value * sigmoid * (1 - sigmoid))
    else:
        output.unsafe_store(row * hidden + h, value * sigmoid)


@always_inline
def _glu_four_rows[
    width: Int, neuron_major: Bool, backward: Bool
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    grad_output: Pointer[Float32, _],
    output: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    hidden: Int,
    b: Int,
    d: Int,
    h: Int,
):
    """Store `width` hidden units from h of batch rows b to b + 3 of neuron d.

    Each weight vector loaded serves four rows, so the loop does eight FMAs
    per two vector loads instead of two. See `_glu_store` for `backward`.
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
    var r0 = _row[neuron_major](b, d, batch, neurons)
    var r1 = _row[neuron_major](b + 1, d, batch, neurons)
    var r2 = _row[neuron_major](b + 2, d, batch, neurons)
    var r3 = _row[neuron_major](b + 3, d, batch, neurons)
    var weight_row = d * memory * outputs
    for m in range(memory):
        var w = weight_row + m * outputs + h
        var w_value = weight.unsafe_load[width=width](w)
        var w_gate = weight.unsafe_load[width=width](w + hidden)
        var x0 = SIMD[DType.float32, width](trace[unsafe_offset=r0 * memory + m])
        var x1 = SIMD[DType.float32, width](trace[unsafe_offset=r1 * memory + m])
        var x2 = SIMD[DType.float32, width](trace[unsafe_offset=r2 * memory + m])
        var x3 = SIMD[DType.float32, width](trace[unsafe_offset=r3 * memory + m])
        v0 = x0.fma(w_value, v0)
        g0 = x0.fma(w_gate, g0)
        v1 = x1.fma(w_value, v1)
        g1 = x1.fma(w_gate, g1)
        v2 = x2.fma(w_value, v2)
        g2 = x2.fma(w_gate, g2)
        v3 = x3.fma(w_value, v3)
        g3 = x3.fma(w_gate, g3)
    _glu_store[width, backward](output, grad_output, v0, g0, hidden, r0, h)
    _glu_store[width, backward](output, grad_output, v1, g1, hidden, r1, h)
    _glu_store[width, backward](output, grad_output, v2, g2, hidden, r2, h)
    _glu_store[width, backward](output, grad_output, v3, g3, hidden, r3, h)


@always_inline
def _neuron_rows[
    width: Int, neuron_major: Bool, backward: Bool
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    grad_output: Pointer[Float32, _],
    output: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    hidden: Int,
    d: Int,
):
    """Store the GLU outputs (or d_pre) of neuron d for every batch row, four rows at a time."""
    var row_stop = batch // 4 * 4
    var vector_stop = hidden // width * width
    for h in range(0, vector_stop, width):
        for b in range(0, row_stop, 4):
            _glu_four_rows[width, neuron_major, backward](
                trace, weight, bias, grad_output, output, batch, neurons, memory, hidden, b, d, h
            )
        for b in range(row_stop, batch):
            var row = _row[neuron_major](b, d, batch, neurons)
            var pre = _pre_activations[width](trace, weight, bias, memory, hidden, row, d, h)
            _glu_store[width, backward](output, grad_output, pre[0], pre[1], hidden, row, h)
    for h in range(vector_stop, hidden):
        for b in range(0, row_stop, 4):
            _glu_four_rows[1, neuron_major, backward](
                trace, weight, bias, grad_output, output, batch, neurons, memory, hidden, b, d, h
            )
        for b in range(row_stop, batch):
            var row = _row[neuron_major](b, d, batch, neurons)
            var pre = _pre_activations[1](trace, weight, bias, memory, hidden, row, d, h)
            _glu_store[1, backward](output, grad_output, pre[0], pre[1], hidden, row, h)


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
    _glu_store[width, True](d_pre, grad_output, pre[0], pre[1], hidden, row, h)


@always_inline
def _load_head[
    width: Int
](source: Pointer[Float32, _], start: Int, count: Int) -> SIMD[DType.float32, width]:
    """Load min(count, width) floats from start, with zeros in the lanes past count."""
    if count >= width:
        return source.unsafe_load[width=width](start)
    var vector = SIMD[DType.float32, width](0)
    for i in range(count):
        vector[i] = source[unsafe_offset=start + i]
    return vector


@always_inline
def _store_head[
    width: Int
](target: Pointer[mut=True, Float32, _], start: Int, vector: SIMD[DType.float32, width], count: Int):
    """Store the first min(count, width) lanes of vector from start."""
    if count >= width:
        target.unsafe_store(start, vector)
        return
    for i in range(count):
        target[unsafe_offset=start + i] = vector[i]


@always_inline
def _weight_grads[
    width: Int, neuron_major: Bool
](
    trace: Pointer[Float32, _],
    d_pre: Pointer[Float32, _],
    d_weight: Pointer[mut=True, Float32, _],
    d_bias: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    outputs: Int,
    d: Int,
    o: Int,
):
    """Write d_weight and d_bias of neuron d for `width` outputs from o, summing rows in order.

    Four trace slots at a time, so four independent FMA chains hide the FMA latency.
    """
    var m = 0
    while m + 4 <= memory:
        var acc0 = SIMD[DType.float32, width](0)
        var acc1 = acc0
        var acc2 = acc0
        var acc3 = acc0
        for b in range(batch):
            var row = _row[neuron_major](b, d, batch, neurons)
            var g = d_pre.unsafe_load[width=width](row * outputs + o)
            var t = row * memory + m
            acc0 = SIMD[DType.float32, width](trace[unsafe_offset=t]).fma(g, acc0)
            acc1 = SIMD[DType.float32, width](trace[unsafe_offset=t + 1]).fma(g, acc1)
            acc2 = SIMD[DType.float32, width](trace[unsafe_offset=t + 2]).fma(g, acc2)
            acc3 = SIMD[DType.float32, width](trace[unsafe_offset=t + 3]).fma(g, acc3)
        var w = (d * memory + m) * outputs + o
        d_weight.unsafe_store(w, acc0)
        d_weight.unsafe_store(w + outputs, acc1)
        d_weight.unsafe_store(w + 2 * outputs, acc2)
        d_weight.unsafe_store(w + 3 * outputs, acc3)
        m += 4
    while m < memory:
        var acc = SIMD[DType.float32, width](0)
        for b in range(batch):
            var row = _row[neuron_major](b, d, batch, neurons)
            var t = SIMD[DType.float32, width](trace[unsafe_offset=row * memory + m])
            acc = t.fma(d_pre.unsafe_load[width=width](row * outputs + o), acc)
        d_weight.unsafe_store((d * memory + m) * outputs + o, acc)
        m += 1
    var acc = SIMD[DType.float32, width](0)
    for b in range(batch):
        acc += d_pre.unsafe_load[width=width](_row[neuron_major](b, d, batch, neurons) * outputs + o)
    d_bias.unsafe_store(d * outputs + o, acc)


@always_inline
def _trace_grads[
    width: Int, neuron_major: Bool
](
    weight_t: Pointer[Float32, _],
    d_pre: Pointer[Float32, _],
    d_trace: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    padded: Int,
    outputs: Int,
    b: Int,
    d: Int,
):
    """Write d_trace of batch rows b to b + 3 of neuron d, rows past the batch skipped.

    Each vector covers `width` trace slots and sums over the outputs. `weight_t` is
    the neuron's weight transposed to (O, padded), see `_neuron_backward`. The rows
    share each weight load, and even and odd outputs go to separate sums, so eight
    FMA chains run side by side.
    """
    var rows = min(4, batch - b)
    var r0 = _row[neuron_major](b, d, batch, neurons)
    var r1 = _row[neuron_major](min(b + 1, batch - 1), d, batch, neurons)
    var r2 = _row[neuron_major](min(b + 2, batch - 1), d, batch, neurons)
    var r3 = _row[neuron_major](min(b + 3, batch - 1), d, batch, neurons)
    var k = 0
    while k < memory:
        var e0 = SIMD[DType.float32, width](0)
        var e1 = e0
        var e2 = e0
        var e3 = e0
        var f0 = e0
        var f1 = e0
        var f2 = e0
        var f3 = e0
        var o = 0
        while o < outputs:  # outputs = 2H, so the pairs cover them all
            var w = weight_t.unsafe_load[width=width](o * padded + k)
            var v = weight_t.unsafe_load[width=width]((o + 1) * padded + k)
            e0 = SIMD[DType.float32, width](d_pre[unsafe_offset=r0 * outputs + o]).fma(w, e0)
            e1 = SIMD[DType.float32, width](d_pre[unsafe_offset=r1 * outputs + o]).fma(w, e1)
            e2 = SIMD[DType.float32, width](d_pre[unsafe_offset=r2 * outputs + o]).fma(w, e2)
            e3 = SIMD[DType.float32, width](d_pre[unsafe_offset=r3 * outputs + o]).fma(w, e3)
            f0 = SIMD[DType.float32, width](d_pre[unsafe_offset=r0 * outputs + o + 1]).fma(v, f0)
            f1 = SIMD[DType.float32, width](d_pre[unsafe_offset=r1 * outputs + o + 1]).fma(v, f1)
            f2 = SIMD[DType.float32, width](d_pre[unsafe_offset=r2 * outputs + o + 1]).fma(v, f2)
            f3 = SIMD[DType.float32, width](d_pre[unsafe_offset=r3 * outputs + o + 1]).fma(v, f3)
            o += 2
        var count = memory - k
        _store_head[width](d_trace, r0 * memory + k, e0 + f0, count)
        if rows > 1:
            _store_head[width](d_trace, r1 * memory + k, e1 + f1, count)
        if rows > 2:
            _store_head[width](d_trace, r2 * memory + k, e2 + f2, count)
        if rows > 3:
            _store_head[width](d_trace, r3 * memory + k, e3 + f3, count)
        k += width


@always_inline
def _narrow_row[
    width: Int
](
    trace: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    grad_output: Pointer[Float32, _],
    d_pre: Pointer[mut=True, Float32, _],
    d_trace: Pointer[mut=True, Float32, _],
    d_bias: Pointer[mut=True, Float32, _],
    scratch: Pointer[mut=True, Float32, _],
    memory: Int,
    padded: Int,
    hidden: Int,
    row: Int,
    d: Int,
):
    """Add one row's gradients of neuron d when H is below a vector: vectors run over the trace.

    scratch contains the weight and the weight gradient, both transposed to
    (O, padded), then the row's O pre-activations (see `_neuron_backward`).
    """
    var outputs = 2 * hidden
    var weight_t = scratch
    var d_weight_t = scratch.unsafe_offset(outputs * padded)
    var pre = scratch.unsafe_offset(2 * outputs * padded)
    var trace_row = row * memory
    for o in range(outputs):
        var acc = SIMD[DType.float32, width](0)
        var k = 0
        while k < memory:
            var t = _load_head[width](trace, trace_row + k, memory - k)
            acc = t.fma(weight_t.unsafe_load[width=width](o * padded + k), acc)
            k += width
        pre[unsafe_offset=o] = bias[unsafe_offset=d * outputs + o] + acc.reduce_add()
    for h in range(hidden):
        _glu_store[1, True](
            d_pre, grad_output, SIMD[DType.float32, 1](pre[unsafe_offset=h]),
            SIMD[DType.float32, 1](pre[unsafe_offset=hidden + h]), hidden, row, h,
        )
    var pre_row = row * outputs
    for o in range(outputs):
        d_bias[unsafe_offset=d * outputs + o] += d_pre[unsafe_offset=pre_row + o]
    var k = 0
    while k < memory:
        var t = _load_head[width](trace, trace_row + k, memory - k)
        var acc = SIMD[DType.float32, width](0)
        for o in range(outputs):
            var g = SIMD[DType.float32, width](d_pre[unsafe_offset=pre_row + o])
            var slot = o * padded + k
            acc = g.fma(weight_t.unsafe_load[width=width](slot), acc)
            d_weight_t.unsafe_store(slot, g.fma(t, d_weight_t.unsafe_load[width=width](slot)))
        _store_head[width](d_trace, trace_row + k, acc, memory - k)
        k += width


@always_inline
def _transpose_weight[
    width: Int
](
    weight: Pointer[Float32, _],
    weight_t: Pointer[mut=True, Float32, _],
    memory: Int,
    outputs: Int,
    padded: Int,
    d: Int,
):
    """Write neuron d's (M, O) weight transposed to (O, padded), zeros past M."""
    var weight_row = d * memory * outputs
    for m in range(memory):
        var o = 0
        while o + width <= outputs:  # one contiguous load, then one store per lane
            var w = weight.unsafe_load[width=width](weight_row + m * outputs + o)
            comptime for i in range(width):
                weight_t[unsafe_offset=(o + i) * padded + m] = w[i]
            o += width
        while o < outputs:
            weight_t[unsafe_offset=o * padded + m] = weight[unsafe_offset=weight_row + m * outputs + o]
            o += 1
    for o in range(outputs):
        for m in range(memory, padded):
            weight_t[unsafe_offset=o * padded + m] = 0


def _backward_scratch(memory: Int, hidden: Int, width: Int) -> Int:
    """Return the floats of `_neuron_backward`'s scratch: two (O, padded) tables and O floats."""
    var outputs = 2 * hidden
    return 2 * outputs * ceildiv(memory, width) * width + outputs


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
    scratch: Pointer[mut=True, Float32, _],
    batch: Int,
    neurons: Int,
    memory: Int,
    hidden: Int,
    d: Int,
):
    """Write every gradient of neuron d.

    With H at least a vector, d_pre of every row comes first (four rows per weight
    load, as in the forward), then d_weight and d_bias with vectors along the
    outputs, then d_trace. From four rows on, d_trace reads the weight transposed
    into scratch as (O, padded), M padded with zeros to a multiple of `width`, so
    it sums over the outputs with vectors along the trace instead of one
    horizontal sum per trace slot. With H below a vector each row is done in one
    pass with vectors along the trace, and d_weight is summed transposed in the
    scratch's second table.

    At D 512, M 25, H 32 on a 2-core AVX-512 CPU this took the call from 1,357
    to 800 us at B 16, and at M 32, H 1 from 675 to 287 us, against a pass per
    row with one dot product per trace slot. At B 1 the transpose took the call
    from 279 to 436 us, hence the dot products below four rows.
    """
    var outputs = 2 * hidden
    var padded = ceildiv(memory, width) * width
    var weight_row = d * memory * outputs
    if hidden >= width:
        _neuron_rows[width, neuron_major, True](
            trace, weight, bias, grad_output, d_pre, batch, neurons, memory, hidden, d
        )
        var vector_stop = outputs // width * width
        for o in range(0, vector_stop, width):
            _weight_grads[width, neuron_major](
                trace, d_pre, d_weight, d_bias, batch, neurons, memory, outputs, d, o
            )
        for o in range(vector_stop, outputs):
            _weight_grads[1, neuron_major](
                trace, d_pre, d_weight, d_bias, batch, neurons, memory, outputs, d, o
            )
        if batch < 4:
            # Too few rows to repay the transpose: one dot product per trace slot.
            for b in range(batch):
                var row = _row[neuron_major](b, d, batch, neurons)
                for m in range(memory):
                    d_trace[unsafe_offset=row * memory + m] = _dot[1](
                        weight, weight_row + m * outputs, d_pre, row * outputs, outputs
                    )[0]
            return
        _transpose_weight[width](weight, scratch, memory, outputs, padded, d)
        for b in range(0, batch, 4):
            _trace_grads[width, neuron_major](
                scratch, d_pre, d_trace, batch, neurons, memory, padded, outputs, b, d
            )
        return
    _transpose_weight[width](weight, scratch, memory, outputs, padded, d)
    var d_weight_t = scratch.unsafe_offset(outputs * padded)
    for i in range(outputs * padded):
        d_weight_t[unsafe_offset=i] = 0
    for o in range(outputs):
        d_bias[unsafe_offset=d * outputs + o] = 0
    for b in range(batch):
        _narrow_row[width](
            trace, bias, grad_output, d_pre, d_trace, d_bias, scratch, memory, padded, hidden, _row[neuron_major](b, d, batch, neurons), d,
        )
    for m in range(memory):
        for o in range(outputs):
            d_weight[unsafe_offset=weight_row + m * outputs + o] = d_weight_t[unsafe_offset=o * padded + m]
