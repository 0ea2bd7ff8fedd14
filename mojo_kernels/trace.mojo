"""The CTM's trace window: push one new pre-activation per row, drop the oldest.

For R rows of M slots, forward:

    out[r, m]     = trace[r, m + 1]   for m < M - 1
    out[r, M - 1] = new[r]

and its gradient, given the gradient on `out` (the sum of two gradients in
`trace_push_backward_sum`, which saves the caller an add):

    d_trace[r, 0] = 0,  d_trace[r, m] = grad[r, m - 1]  for m >= 1
    d_new[r]      = grad[r, M - 1]

Rows are stored one after another, so on the CPU each op is one shifted copy
of the flat buffer followed by a write per row.
"""

from extensibility import (
    InputTensor,
    OutputTensor,
    get_kernel_simd_width,
    register,
)
from layout import Coord
from max.algorithm.functional import elementwise, sync_parallelize
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.math import ceildiv

from .checks import check_dense, check_dim
from .host import host_context


def _check_window(
    op: StaticString,
    window: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
    rows: Int,
    slots: Int,
    name: StaticString,
) raises:
    check_dim(op, name, window, 0, rows)
    check_dim(op, name, window, 1, slots)
    check_dense(op, name, window)


@always_inline
def _shifted_copy[
    width: Int, offset: Int, two: Bool
](
    dst: Pointer[mut=True, Float32, _],
    a: Pointer[Float32, _],
    b: Pointer[Float32, _],
    start: Int,
    stop: Int,
):
    """dst[i] = a[i + offset] (+ b[i + offset] when `two`) for i in [start, stop)."""
    var i = start
    while i + width <= stop:
        var v = a.unsafe_load[width=width](i + offset)
        comptime if two:
            v += b.unsafe_load[width=width](i + offset)
        dst.unsafe_store(i, v)
        i += width
    while i < stop:
        var s = a[unsafe_offset=i + offset]
        comptime if two:
            s += b[unsafe_offset=i + offset]
        dst[unsafe_offset=i] = s
        i += 1


@register("trace_push")
struct TracePush:
    """`out` (R, M) from `trace` (R, M) and `new` (R,)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        trace: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        new: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "trace_push"
        var rows = trace.dim_size(0)
        var slots = trace.dim_size(1)
        check_dense(op, "trace", trace)
        check_dim(op, "new", new, 0, rows)
        check_dim(op, "output", output, 0, rows)
        check_dim(op, "output", output, 1, slots)
        check_dense(op, "output", output)
        if rows == 0 or slots == 0:
            return
        var tp = trace.unsafe_ptr()
        var np = new.unsafe_ptr()
        var op_ = output.unsafe_ptr()
        comptime width = get_kernel_simd_width[DType.float32, target]()

        comptime if target == "cpu":
            var tasks = max(1, min(rows, parallelism_level(host_context(ctx))))
            var chunk = ceildiv(rows, tasks)

            def push_rows(task: Int) {
                var tp, var np, var op_, var rows, var slots, var chunk,
            }:
                var first = task * chunk
                var last = min(first + chunk, rows)
                if first >= last:
                    return
                # Stops one short so that the copy never reads past the task's rows.
                _shifted_copy[width, 1, False](
                    op_, tp, tp, first * slots, last * slots - 1
                )
                for r in range(first, last):
                    op_[unsafe_offset=r * slots + slots - 1] = np[unsafe_offset=r]

            sync_parallelize(push_rows, tasks, host_context(ctx))
        else:

            def push[
                width: Int, alignment: Int = 1
            ](idx: Coord[...]) {var tp, var np, var op_, var slots}:
                var r = Int(idx[0].value())
                var m = Int(idx[1].value())
                var i = r * slots + m
                op_[unsafe_offset=i] = (
                    np[unsafe_offset=r] if m == slots - 1 else tp[unsafe_offset=i + 1]
                )

            elementwise[simd_width=1, target=target](
                push, Coord(rows, slots), ctx
            )


def _push_backward[
    target: StaticString, two: Bool
](
    op: StaticString,
    d_trace: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
    d_new: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
    grad: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
    other: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
    ctx: DeviceContext,
) raises:
    var rows = grad.dim_size(0)
    var slots = grad.dim_size(1)
    check_dense(op, "grad", grad)
    comptime if two:
        _check_window(op, other, rows, slots, "other")
    check_dim(op, "d_trace", d_trace, 0, rows)
    check_dim(op, "d_trace", d_trace, 1, slots)
    check_dense(op, "d_trace", d_trace)
    check_dim(op, "d_new", d_new, 0, rows)
    if rows == 0 or slots == 0:
        return
    var gp = grad.unsafe_ptr()
    var hp = other.unsafe_ptr()
    var xp = d_trace.unsafe_ptr()
    var np = d_new.unsafe_ptr()
    comptime width = get_kernel_simd_width[DType.float32, target]()

    comptime if target == "cpu":
        var tasks = max(1, min(rows, parallelism_level(host_context(ctx))))
        var chunk = ceildiv(rows, tasks)

        def pull_rows(task: Int) {
            var gp, var hp, var xp, var np, var rows, var slots, var chunk,
        }:
            var first = task * chunk
            var last = min(first + chunk, rows)
            if first >= last:
                return
            # Starts one late so that the copy never reads before the task's rows.
            _shifted_copy[width, -1, two](
                xp, gp, hp, first * slots + 1, last * slots
            )
            for r in range(first, last):
                var end = r * slots + slots - 1
                var s = gp[unsafe_offset=end]
                comptime if two:
                    s += hp[unsafe_offset=end]
                np[unsafe_offset=r] = s
                xp[unsafe_offset=r * slots] = 0

        sync_parallelize(pull_rows, tasks, host_context(ctx))
    else:

        def pull[
            width: Int, alignment: Int = 1
        ](idx: Coord[...]) {var gp, var hp, var xp, var np, var slots}:
            var r = Int(idx[0].value())
            var m = Int(idx[1].value())
            var i = r * slots + m
            var previous = Float32(0)
            if m > 0:
                previous = gp[unsafe_offset=i - 1]
                comptime if two:
                    previous += hp[unsafe_offset=i - 1]
            xp[unsafe_offset=i] = previous
            if m == slots - 1:
                var s = gp[unsafe_offset=i]
                comptime if two:
                    s += hp[unsafe_offset=i]
                np[unsafe_offset=r] = s

        elementwise[simd_width=1, target=target](
            pull, Coord(rows, slots), ctx
        )


@register("trace_push_backward")
struct TracePushBackward:
    """`(d_trace (R, M), d_new (R,))` from the gradient on the pushed window."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        d_trace: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        d_new: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        grad: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _push_backward[target, False](
            "trace_push_backward", d_trace, d_new, grad, grad, ctx
        )


@register("trace_push_backward_sum")
struct TracePushBackwardSum:
    """`trace_push_backward` of the sum of two gradients on the pushed window."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        d_trace: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        d_new: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        grad: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        other: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _push_backward[target, True](
            "trace_push_backward_sum", d_trace, d_new, grad, other, ctx
        )
