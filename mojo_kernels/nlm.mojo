"""Neuron-level models: one small GLU network per neuron over its trace window.

For batch row b, neuron d and hidden unit h, with O = 2H pre-activations per neuron:

    pre[b, d, o] = bias[d, o] + sum_m trace[b, d, m] * weight[d, m, o]
    out[b, d, h] = pre[b, d, h] * sigmoid(pre[b, d, H + h])

The backward pass recomputes `pre` instead of storing it.
"""

from extensibility import (
    InputTensor,
    OutputTensor,
    foreach,
    get_kernel_simd_width,
    register,
)
from layout import Coord
from max.algorithm.functional import elementwise
from max.gpu.host import DeviceContext
from std.math import exp

from .checks import check_dense, check_dim


@always_inline
def _sigmoid[width: Int](x: SIMD[DType.float32, width]) -> SIMD[DType.float32, width]:
    return 1 / (1 + exp(-x))


@always_inline
def _pre_activations[
    width: Int
](
    trace: Pointer[Float32, _],
    weight: Pointer[Float32, _],
    bias: Pointer[Float32, _],
    memory: Int,
    hidden: Int,
    b: Int,
    d: Int,
    neurons: Int,
    h: Int,
) -> Tuple[SIMD[DType.float32, width], SIMD[DType.float32, width]]:
    """Return the value and gate pre-activations of `width` hidden units from h.
    """
    var outputs = 2 * hidden
    var value = bias.unsafe_load[width=width](d * outputs + h)
    var gate = bias.unsafe_load[width=width](d * outputs + hidden + h)
    var trace_row = (b * neurons + d) * memory
    var weight_row = d * memory * outputs
    for m in range(memory):
        var t = SIMD[DType.float32, width](trace[unsafe_offset=trace_row + m])
        var w = weight_row + m * outputs + h
        value = t.fma(weight.unsafe_load[width=width](w), value)
        gate = t.fma(weight.unsafe_load[width=width](w + hidden), gate)
    return (value, gate)


def _check_nlm_shapes(
    op: StaticString,
    trace: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    weight: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
    bias: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
) raises:
    var neurons = trace.dim_size(1)
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


@register("nlm_forward")
struct NlmForward:
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
        comptime op = "nlm_forward"
        _check_nlm_shapes(op, trace, weight, bias)
        var neurons = trace.dim_size(1)
        var memory = trace.dim_size(2)
        var hidden = weight.dim_size(2) // 2
        check_dim(op, "output", output, 0, trace.dim_size(0))
        check_dim(op, "output", output, 1, neurons)
        check_dim(op, "output", output, 2, hidden)
        var tp = trace.unsafe_ptr()
        var wp = weight.unsafe_ptr()
        var bp = bias.unsafe_ptr()

        def glu[
            width: Int
        ](idx: Coord[...]) {
            var tp, var wp, var bp, var memory, var hidden, var neurons,
        } -> SIMD[DType.float32, width]:
            var pre = _pre_activations[width](
                tp, wp, bp, memory, hidden,
                Int(idx[0].value()), Int(idx[1].value()), neurons,
                Int(idx[2].value()),
            )
            return pre[0] * _sigmoid(pre[1])

        foreach[target=target](glu, output, ctx)


@register("nlm_backward")
struct NlmBackward:
    """Gradients of `nlm_forward` given the gradient on its output.

    `d_pre` (B, D, 2H), the gradient on the pre-activations, is an output too,
    written first and read by the three contractions. On the CPU one work item
    per neuron does all four steps for every batch row in turn, so that the
    neuron's weights and weight gradient stay in L1 and each d_pre row is used
    right after it is written. On a GPU, one thread per output element runs
    each step as its own pass over the whole batch.
    """

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
        comptime op = "nlm_backward"
        _check_nlm_shapes(op, trace, weight, bias)
        var batch = trace.dim_size(0)
        var neurons = trace.dim_size(1)
        var memory = trace.dim_size(2)
        var outputs = weight.dim_size(2)
        var hidden = outputs // 2
        check_dim(op, "grad_output", grad_output, 0, batch)
        check_dim(op, "grad_output", grad_output, 1, neurons)
        check_dim(op, "grad_output", grad_output, 2, hidden)
        check_dense(op, "grad_output", grad_output)
        check_dense(op, "d_pre", d_pre)
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
            var neurons,
        }:
            var b = Int(idx[0].value())
            var d = Int(idx[1].value())
            var h = Int(idx[2].value())
            var pre = _pre_activations[width](
                tp, wp, bp, memory, hidden, b, d, neurons, h
            )
            var gate = _sigmoid(pre[1])
            var grad = gp.unsafe_load[width=width]((b * neurons + d) * hidden + h)
            var row = (b * neurons + d) * 2 * hidden
            dp.unsafe_store(row + h, grad * gate)
            dp.unsafe_store(
                row + hidden + h, grad * pre[0] * gate * (1 - gate)
            )

        # One work item per trace element: a dot product over the 2H outputs.
        def trace_grads[
            width: Int
        ](idx: Coord[...]) {
            var wp, var dp, var outputs, var memory, var neurons,
        } -> SIMD[DType.float32, width]:
            var b = Int(idx[0].value())
            var d = Int(idx[1].value())
            var m = Int(idx[2].value())
            var w_row = (d * memory + m) * outputs
            var g_row = (b * neurons + d) * outputs
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
                var t = SIMD[DType.float32, width](
                    tp[unsafe_offset=(b * neurons + d) * memory + m]
                )
                acc = t.fma(
                    dp.unsafe_load[width=width]((b * neurons + d) * outputs + o),
                    acc,
                )
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
                acc += dp.unsafe_load[width=width]((b * neurons + d) * outputs + o)
            return acc

        comptime if target == "cpu":
            var xp = d_trace.unsafe_ptr()
            var dwp = d_weight.unsafe_ptr()
            var dbp = d_bias.unsafe_ptr()

            def neuron_grads[
                simd: Int, alignment: Int = 1
            ](idx: Coord[...]) {
                var tp, var wp, var bp, var gp, var dp, var xp, var dwp,
                var dbp, var batch, var neurons, var memory, var hidden,
            }:
                _neuron_backward[width](
                    tp, wp, bp, gp, dp, xp, dwp, dbp, batch, neurons, memory,
                    hidden, Int(idx[0].value()),
                )

            elementwise[simd_width=1, target=target](
                neuron_grads, Coord(neurons), ctx
            )
        else:
            elementwise[simd_width=width, target=target](
                pre_grads, Coord(batch, neurons, hidden), ctx
            )
            foreach[target=target, simd_width=1](trace_grads, d_trace, ctx)
            foreach[target=target](weight_grads, d_weight, ctx)
            foreach[target=target](bias_grads, d_bias, ctx)


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
    b: Int,
    d: Int,
    neurons: Int,
    h: Int,
):
    """Write d_pre[b, d] for `width` value units from h and their gates."""
    var pre = _pre_activations[width](
        trace, weight, bias, memory, hidden, b, d, neurons, h
    )
    var gate = _sigmoid(pre[1])
    var grad = grad_output.unsafe_load[width=width]((b * neurons + d) * hidden + h)
    var row = (b * neurons + d) * 2 * hidden
    d_pre.unsafe_store(row + h, grad * gate)
    d_pre.unsafe_store(row + hidden + h, grad * pre[0] * gate * (1 - gate))


@always_inline
def _neuron_backward[
    width: Int
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
        for h in range(0, vector_stop, width):
            _pre_grads[width](
                trace, weight, bias, grad_output, d_pre, memory, hidden, b, d,
                neurons, h,
            )
        for h in range(vector_stop, hidden):
            _pre_grads[1](
                trace, weight, bias, grad_output, d_pre, memory, hidden, b, d,
                neurons, h,
            )
        var pre_row = (b * neurons + d) * outputs
        var trace_row = (b * neurons + d) * memory
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
