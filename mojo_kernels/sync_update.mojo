"""Pairwise synchronisation update of a CTM and its gradient.

Forward, for every batch row b and pair i with neurons l = left[i], r = right[i]:

    alpha'[b, i] = decay[i] * alpha[b, i] + z[b, l] * z[b, r]
    beta'[b, i]  = decay[i] * beta[b, i] + 1
    sync[b, i]   = alpha'[b, i] / sqrt(beta'[b, i])

The pair indices are device data. On the CPU they are checked before the
launch; on a GPU they are clamped into [0, D) so that a bad index reads a
wrong neuron instead of faulting.
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
from std.math import ceildiv, sqrt

from .checks import check_dense, check_dim
from .host import host_context


# Minimum (batch row, pair) elements per CPU task in the backward: at B 16 and 32 pairs, one
# task ran in 35 us and 16 tasks in 58 us (an earlier three-pass kernel on a 2-core CPU).
comptime MIN_TASK_PAIRS = 16384


@always_inline
def _pair_index(indices: Pointer[Int32, _], i: Int, size: Int) -> Int:
    return min(max(Int(indices[unsafe_offset=i]), 0), size - 1)


def _check_pairs[
    target: StaticString
](
    op: StaticString,
    left: InputTensor[dtype = DType.int32, rank=1, static_spec=_],
    right: InputTensor[dtype = DType.int32, rank=1, static_spec=_],
    size: Int,
) raises:
    comptime if target == "cpu":
        var lp = left.unsafe_ptr()
        var rp = right.unsafe_ptr()
        for i in range(left.dim_size(0)):
            var l = Int(lp[unsafe_offset=i])
            var r = Int(rp[unsafe_offset=i])
            if l < 0 or l >= size or r < 0 or r >= size:
                raise Error(
                    op, ": pair ", i, " = (", l, ", ", r,
                    ") is out of range for ", size, " neurons",
                )


@register("sync_update")
struct SyncUpdate:
    @staticmethod
    def execute[
        target: StaticString
    ](
        alpha_out: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        beta_out: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        sync_out: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        z: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        left: InputTensor[dtype = DType.int32, rank=1, static_spec=_],
        right: InputTensor[dtype = DType.int32, rank=1, static_spec=_],
        decay: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        alpha: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        beta: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "sync_update"
        var batch = z.dim_size(0)
        var neurons = z.dim_size(1)
        var pairs = left.dim_size(0)
        check_dim(op, "right", right, 0, pairs)
        check_dim(op, "decay", decay, 0, pairs)
        check_dim(op, "alpha", alpha, 0, batch)
        check_dim(op, "alpha", alpha, 1, pairs)
        check_dim(op, "beta", beta, 0, batch)
        check_dim(op, "beta", beta, 1, pairs)
        check_dense(op, "z", z)
        check_dense(op, "alpha", alpha)
        check_dense(op, "beta", beta)
        check_dense(op, "alpha_out", alpha_out)
        check_dense(op, "beta_out", beta_out)
        check_dense(op, "sync_out", sync_out)
        if batch == 0 or pairs == 0:
            return
        if neurons == 0:
            raise Error(op, ": z has no neurons but there are ", pairs, " pairs")
        _check_pairs[target](op, left, right, neurons)

        var zp = z.unsafe_ptr()
        var lp = left.unsafe_ptr()
        var rp = right.unsafe_ptr()
        var dp = decay.unsafe_ptr()
        var ap = alpha.unsafe_ptr()
        var bp = beta.unsafe_ptr()
        var ao = alpha_out.unsafe_ptr()
        var bo = beta_out.unsafe_ptr()
        var so = sync_out.unsafe_ptr()

        def update[
            width: Int, alignment: Int = 1
        ](idx: Coord[...]) {
            var zp, var lp, var rp, var dp, var ap, var bp, var ao, var bo,
            var so, var neurons, var pairs,
        }:
            var b = Int(idx[0].value())
            var i = Int(idx[1].value())
            var row = b * pairs + i
            var product = SIMD[DType.float32, width]()
            comptime for lane in range(width):
                var l = _pair_index(lp, i + lane, neurons)
                var r = _pair_index(rp, i + lane, neurons)
                product[lane] = (
                    zp[unsafe_offset=b * neurons + l]
                    * zp[unsafe_offset=b * neurons + r]
                )
            var d = dp.unsafe_load[width=width](i)
            var a_new = d * ap.unsafe_load[width=width](row) + product
            var b_new = d * bp.unsafe_load[width=width](row) + 1
            ao.unsafe_store(row, a_new)
            bo.unsafe_store(row, b_new)
            so.unsafe_store(row, a_new / sqrt(b_new))

        comptime width = get_kernel_simd_width[DType.float32, target]()
        elementwise[simd_width=width, target=target](
            update, Coord(batch, pairs), ctx
        )


@register("sync_update_backward")
struct SyncUpdateBackward:
    """Gradient of `sync_update` given the gradients of its three outputs.

    With A = grad_alpha + grad_sync / sqrt(beta') and
    G = grad_beta - grad_sync * sync / (2 beta'), the total gradients on
    alpha' and beta':

        d_alpha = decay * A,  d_beta = decay * G
        d_decay[i] = sum_b A[b, i] * alpha[b, i] + G[b, i] * beta[b, i]
        d_z[b, l] += A[b, i] * z[b, r],  d_z[b, r] += A[b, i] * z[b, l]

    On the CPU one pass computes everything: each task owns a range of batch
    rows and sums their decay gradient into a partial of its own, and the
    partials are added at the end. With at least as many pairs as neurons, rows
    go in blocks of one SIMD vector, whose scatter into d_z updates every row of
    the block at once (`_backward_block`).
    On a GPU three passes (state gradients, decay gradient, neuron scatter)
    each recompute A.
    d_z is accumulated per batch row, pairs in order, so the result is
    deterministic and the same on both targets. NOTE: on a GPU that gives
    only `B` threads; an atomic scatter would be faster there.
    """

    @staticmethod
    def execute[
        target: StaticString
    ](
        d_z: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        d_decay: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        d_alpha: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        d_beta: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        z: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        left: InputTensor[dtype = DType.int32, rank=1, static_spec=_],
        right: InputTensor[dtype = DType.int32, rank=1, static_spec=_],
        decay: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        alpha: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        beta: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        grad_alpha: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        grad_beta: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        grad_sync: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "sync_update_backward"
        var batch = z.dim_size(0)
        var neurons = z.dim_size(1)
        var pairs = left.dim_size(0)
        check_dim(op, "right", right, 0, pairs)
        check_dim(op, "decay", decay, 0, pairs)
        check_dim(op, "alpha", alpha, 0, batch)
        check_dim(op, "alpha", alpha, 1, pairs)
        check_dim(op, "beta", beta, 0, batch)
        check_dim(op, "beta", beta, 1, pairs)
        check_dim(op, "grad_alpha", grad_alpha, 0, batch)
        check_dim(op, "grad_alpha", grad_alpha, 1, pairs)
        check_dim(op, "grad_beta", grad_beta, 0, batch)
        check_dim(op, "grad_beta", grad_beta, 1, pairs)
        check_dim(op, "grad_sync", grad_sync, 0, batch)
        check_dim(op, "grad_sync", grad_sync, 1, pairs)
        check_dense(op, "z", z)
        check_dense(op, "alpha", alpha)
        check_dense(op, "beta", beta)
        check_dense(op, "grad_alpha", grad_alpha)
        check_dense(op, "grad_beta", grad_beta)
        check_dense(op, "grad_sync", grad_sync)
        check_dense(op, "d_z", d_z)
        check_dense(op, "d_alpha", d_alpha)
        check_dense(op, "d_beta", d_beta)
        if pairs > 0 and batch > 0 and neurons == 0:
            raise Error(op, ": z has no neurons but there are ", pairs, " pairs")
        _check_pairs[target](op, left, right, neurons)

        var zp = z.unsafe_ptr()
        var lp = left.unsafe_ptr()
        var rp = right.unsafe_ptr()
        var dp = decay.unsafe_ptr()
        var ap = alpha.unsafe_ptr()
        var bp = beta.unsafe_ptr()
        var gap = grad_alpha.unsafe_ptr()
        var gbp = grad_beta.unsafe_ptr()
        var gsp = grad_sync.unsafe_ptr()
        var dzp = d_z.unsafe_ptr()
        var ddp = d_decay.unsafe_ptr()
        var dap = d_alpha.unsafe_ptr()
        var dbp = d_beta.unsafe_ptr()
        comptime width = get_kernel_simd_width[DType.float32, target]()

        def state_grads[
            width: Int, alignment: Int = 1
        ](idx: Coord[...]) {
            var zp, var lp, var rp, var dp, var ap, var bp, var gap, var gbp,
            var gsp, var dap, var dbp, var neurons, var pairs,
        }:
            var b = Int(idx[0].value())
            var i = Int(idx[1].value())
            var row = b * pairs + i
            var total = _total_grads[width](
                zp, lp, rp, dp, ap, bp, gap, gbp, gsp, neurons, pairs, b, i
            )
            var d = dp.unsafe_load[width=width](i)
            dap.unsafe_store(row, d * total[0])
            dbp.unsafe_store(row, d * total[1])

        def decay_grads[
            width: Int, alignment: Int = 1
        ](idx: Coord[...]) {
            var zp, var lp, var rp, var dp, var ap, var bp, var gap, var gbp,
            var gsp, var ddp, var neurons, var pairs, var batch,
        }:
            var i = Int(idx[0].value())
            var acc = SIMD[DType.float32, width](0)
            for b in range(batch):
                var row = b * pairs + i
                var total = _total_grads[width](
                    zp, lp, rp, dp, ap, bp, gap, gbp, gsp, neurons, pairs, b, i
                )
                acc += total[0] * ap.unsafe_load[width=width](row)
                acc += total[1] * bp.unsafe_load[width=width](row)
            ddp.unsafe_store(i, acc)

        def neuron_grads[
            width: Int, alignment: Int = 1
        ](idx: Coord[...]) {
            var zp, var lp, var rp, var dp, var ap, var bp, var gap, var gbp,
            var gsp, var dzp, var neurons, var pairs,
        }:
            var b = Int(idx[0].value())
            var z_row = b * neurons
            for j in range(neurons):
                dzp[unsafe_offset=z_row + j] = 0
            for i in range(pairs):
                var row = b * pairs + i
                var d_product = _alpha_grad[1](
                    dp[unsafe_offset=i],
                    bp[unsafe_offset=row],
                    gap[unsafe_offset=row],
                    gsp[unsafe_offset=row],
                )
                var l = _pair_index(lp, i, neurons)
                var r = _pair_index(rp, i, neurons)
                var zl = zp[unsafe_offset=z_row + l]
                var zr = zp[unsafe_offset=z_row + r]
                dzp[unsafe_offset=z_row + l] += d_product * zr
                dzp[unsafe_offset=z_row + r] += d_product * zl

        comptime if target == "cpu":
            # One pass: each task owns a range of batch rows, writes their state and neuron
            # gradients, and sums its rows' decay gradient into a partial of its own; the
            # partials are added after. `elementwise` would give each thread at least 32768
            # items (see nlm.mojo) and keep a pass over a few rows on one thread.
            var tasks = max(
                1,
                min(
                    8 * parallelism_level(host_context(ctx)),
                    ceildiv(batch * pairs, MIN_TASK_PAIRS),
                    batch,
                ),
            )
            # Blocks of rows pay for moving z and d_z of the block to and from neuron-major
            # order, so they serve only when there are at least as many pairs as neurons. At
            # B 16, D 512 and 32 pairs (the CTM benchmark) blocks took 35-38 us against 30-33 us.
            var blocks = batch >= width and pairs >= neurons
            var rows_per_task = ceildiv(batch, tasks)
            if blocks:  # whole blocks per task, the last task excepted
                rows_per_task = ceildiv(rows_per_task, width) * width
            tasks = ceildiv(batch, rows_per_task) if batch > 0 else 0
            # Per task: its decay partial, and the scratch of `_backward_block` (the alpha'
            # gradients of `width` rows, then z and d_z of those rows, neuron-major) or of
            # `_backward_row` (one row of alpha' gradients).
            var partials = List[Float32](length=tasks * pairs, fill=0)
            var partial = partials.unsafe_ptr()
            var scratch_size = width * (pairs + 2 * neurons) if blocks else pairs
            # Left uninitialised, since every float is written before it is read: zero-filling
            # it took the kernel at B 64, S 4096 from 340-354 us to 480 us.
            var scratches = List[Float32](capacity=tasks * scratch_size)
            var scratch_base = scratches.unsafe_ptr()

            def row_task(t: Int) {
                var zp, var lp, var rp, var dp, var ap, var bp, var gap,
                var gbp, var gsp, var dzp, var dap, var dbp, var partial,
                var scratch_base, var scratch_size, var rows_per_task, var batch,
                var neurons, var pairs, var blocks,
            }:
                var acc = partial.unsafe_offset(t * pairs)
                var scratch = scratch_base.unsafe_offset(t * scratch_size)
                var b = t * rows_per_task
                var end = min(b + rows_per_task, batch)
                while blocks and b + width <= end:
                    _backward_block[width](
                        zp, lp, rp, dp, ap, bp, gap, gbp, gsp, dzp, dap, dbp, acc,
                        scratch, neurons, pairs, b,
                    )
                    b += width
                while b < end:
                    _backward_row[width](
                        zp, lp, rp, dp, ap, bp, gap, gbp, gsp, dzp, dap, dbp, acc,
                        scratch, neurons, pairs, b,
                    )
                    b += 1

            if tasks > 0:
                sync_parallelize(row_task, tasks, host_context(ctx))
            var i = 0
            while i + width <= pairs:
                var total = SIMD[DType.float32, width](0)
                for t in range(tasks):
                    total += partial.unsafe_load[width=width](t * pairs + i)
                ddp.unsafe_store(i, total)
                i += width
            while i < pairs:
                var total = Float32(0)
                for t in range(tasks):
                    total += partial[unsafe_offset=t * pairs + i]
                ddp[unsafe_offset=i] = total
                i += 1
            _ = partials^  # the lists live until the sum above has read them
            _ = scratches^
        else:
            if batch > 0 and pairs > 0:
                elementwise[simd_width=width, target=target](
                    state_grads, Coord(batch, pairs), ctx
                )
            if pairs > 0:
                elementwise[simd_width=width, target=target](
                    decay_grads, Coord(pairs), ctx
                )
            if batch > 0 and neurons > 0:
                elementwise[simd_width=1, target=target](
                    neuron_grads, Coord(batch), ctx
                )


@always_inline
def _alpha_grad[
    width: Int
](
    decay: SIMD[DType.float32, width],
    beta: SIMD[DType.float32, width],
    grad_alpha: SIMD[DType.float32, width],
    grad_sync: SIMD[DType.float32, width],
) -> SIMD[DType.float32, width]:
    """Return the total gradient on alpha', which is also the gradient on z_l * z_r.
    """
    var b_new = decay * beta + 1
    return grad_alpha + grad_sync / sqrt(b_new)


@always_inline
def _total_grads[
    width: Int
](
    zp: Pointer[Float32, _],
    lp: Pointer[Int32, _],
    rp: Pointer[Int32, _],
    dp: Pointer[Float32, _],
    ap: Pointer[Float32, _],
    bp: Pointer[Float32, _],
    gap: Pointer[Float32, _],
    gbp: Pointer[Float32, _],
    gsp: Pointer[Float32, _],
    neurons: Int,
    pairs: Int,
    b: Int,
    i: Int,
) -> Tuple[SIMD[DType.float32, width], SIMD[DType.float32, width]]:
    """Return the total gradients on alpha' and beta' for `width` pairs from i.
    """
    var row = b * pairs + i
    var product = SIMD[DType.float32, width]()
    comptime for lane in range(width):
        var l = _pair_index(lp, i + lane, neurons)
        var r = _pair_index(rp, i + lane, neurons)
        product[lane] = (
            zp[unsafe_offset=b * neurons + l] * zp[unsafe_offset=b * neurons + r]
        )
    var d = dp.unsafe_load[width=width](i)
    var a_new = d * ap.unsafe_load[width=width](row) + product
    var b_new = d * bp.unsafe_load[width=width](row) + 1
    var root = sqrt(b_new)
    var grad_sync = gsp.unsafe_load[width=width](row)
    var sync = a_new / root
    var total_alpha = gap.unsafe_load[width=width](row) + grad_sync / root
    var total_beta = gbp.unsafe_load[width=width](row) - grad_sync * sync / (
        2 * b_new
    )
    return (total_alpha, total_beta)


@always_inline
def _backward_row[
    width: Int
](
    zp: Pointer[Float32, _],
    lp: Pointer[Int32, _],
    rp: Pointer[Int32, _],
    dp: Pointer[Float32, _],
    ap: Pointer[Float32, _],
    bp: Pointer[Float32, _],
    gap: Pointer[Float32, _],
    gbp: Pointer[Float32, _],
    gsp: Pointer[Float32, _],
    dzp: Pointer[mut=True, Float32, _],
    dap: Pointer[mut=True, Float32, _],
    dbp: Pointer[mut=True, Float32, _],
    acc: Pointer[mut=True, Float32, _],
    scratch: Pointer[mut=True, Float32, _],
    neurons: Int,
    pairs: Int,
    b: Int,
):
    """Write d_alpha, d_beta and d_z of batch row b, and add its decay gradient to acc (pairs,).

    A vector sweep over the pairs, then a scalar sweep that scatters into d_z in pair order (as
    the GPU's per-row pass does, so both give the same sums). scratch holds `pairs` floats.
    """
    _pair_sweep[width](zp, lp, rp, dp, ap, bp, gap, gbp, gsp, dap, dbp, acc, scratch, neurons, pairs, b)
    var z_row = b * neurons
    for j in range(neurons):
        dzp[unsafe_offset=z_row + j] = 0
    for i in range(pairs):
        var l = z_row + _pair_index(lp, i, neurons)
        var r = z_row + _pair_index(rp, i, neurons)
        var total_alpha = scratch[unsafe_offset=i]
        var zl = zp[unsafe_offset=l]
        var zr = zp[unsafe_offset=r]
        dzp[unsafe_offset=l] += total_alpha * zr
        dzp[unsafe_offset=r] += total_alpha * zl


@always_inline
def _pair_sweep[
    width: Int
](
    zp: Pointer[Float32, _],
    lp: Pointer[Int32, _],
    rp: Pointer[Int32, _],
    dp: Pointer[Float32, _],
    ap: Pointer[Float32, _],
    bp: Pointer[Float32, _],
    gap: Pointer[Float32, _],
    gbp: Pointer[Float32, _],
    gsp: Pointer[Float32, _],
    dap: Pointer[mut=True, Float32, _],
    dbp: Pointer[mut=True, Float32, _],
    acc: Pointer[mut=True, Float32, _],
    scratch: Pointer[mut=True, Float32, _],
    neurons: Int,
    pairs: Int,
    b: Int,
):
    """`_backward_pairs` over all pairs of batch row b, `width` at a time."""
    var i = 0
    while i + width <= pairs:
        _backward_pairs[width](zp, lp, rp, dp, ap, bp, gap, gbp, gsp, dap, dbp, acc, scratch, neurons, pairs, b, i)
        i += width
    while i < pairs:
        _backward_pairs[1](zp, lp, rp, dp, ap, bp, gap, gbp, gsp, dap, dbp, acc, scratch, neurons, pairs, b, i)
        i += 1


@always_inline
def _backward_block[
    width: Int
](
    zp: Pointer[Float32, _],
    lp: Pointer[Int32, _],
    rp: Pointer[Int32, _],
    dp: Pointer[Float32, _],
    ap: Pointer[Float32, _],
    bp: Pointer[Float32, _],
    gap: Pointer[Float32, _],
    gbp: Pointer[Float32, _],
    gsp: Pointer[Float32, _],
    dzp: Pointer[mut=True, Float32, _],
    dap: Pointer[mut=True, Float32, _],
    dbp: Pointer[mut=True, Float32, _],
    acc: Pointer[mut=True, Float32, _],
    scratch: Pointer[mut=True, Float32, _],
    neurons: Int,
    pairs: Int,
    b0: Int,
):
    """`_backward_row` for the `width` rows from b0, with the rows as the lanes of the scatter.

    A scalar scatter into d_z bound the per-row pass; here one vector step per pair updates
    d_z of all `width` rows. z and d_z of the block are kept neuron-major (neurons, width)
    so that a neuron's values in the block are one vector. Each row still adds its pairs'
    terms in pair order, so the sums equal the per-row pass's. scratch holds
    width * (pairs + 2 * neurons) floats.
    """
    var z_t = scratch.unsafe_offset(width * pairs)
    var dz_t = z_t.unsafe_offset(width * neurons)
    for r in range(width):
        _pair_sweep[width](
            zp, lp, rp, dp, ap, bp, gap, gbp, gsp, dap, dbp, acc,
            scratch.unsafe_offset(r * pairs), neurons, pairs, b0 + r,
        )
        var z_row = (b0 + r) * neurons
        for n in range(neurons):
            z_t[unsafe_offset=n * width + r] = zp[unsafe_offset=z_row + n]
    for n in range(neurons):
        dz_t.unsafe_store(n * width, SIMD[DType.float32, width](0))
    var rows = SIMD[DType.int32, width]()
    comptime for lane in range(width):
        rows[lane] = Int32(lane * pairs)
    for i in range(pairs):
        var total_alpha = scratch.unsafe_offset(i).unsafe_gather(rows)  # (width,) over rows
        var l = _pair_index(lp, i, neurons) * width
        var r = _pair_index(rp, i, neurons) * width
        var zl = z_t.unsafe_load[width=width](l)
        var zr = z_t.unsafe_load[width=width](r)
        dz_t.unsafe_store(l, dz_t.unsafe_load[width=width](l) + total_alpha * zr)
        dz_t.unsafe_store(r, dz_t.unsafe_load[width=width](r) + total_alpha * zl)
    for r in range(width):
        var z_row = (b0 + r) * neurons
        for n in range(neurons):
            dzp[unsafe_offset=z_row + n] = dz_t[unsafe_offset=n * width + r]


@always_inline
def _backward_pairs[
    width: Int
](
    zp: Pointer[Float32, _],
    lp: Pointer[Int32, _],
    rp: Pointer[Int32, _],
    dp: Pointer[Float32, _],
    ap: Pointer[Float32, _],
    bp: Pointer[Float32, _],
    gap: Pointer[Float32, _],
    gbp: Pointer[Float32, _],
    gsp: Pointer[Float32, _],
    dap: Pointer[mut=True, Float32, _],
    dbp: Pointer[mut=True, Float32, _],
    acc: Pointer[mut=True, Float32, _],
    scratch: Pointer[mut=True, Float32, _],
    neurons: Int,
    pairs: Int,
    b: Int,
    i: Int,
):
    """The backward of `width` pairs from i in batch row b, except the scatter into d_z.

    Writes d_alpha and d_beta, adds the decay gradient to acc (pairs,) and leaves the total
    gradient on alpha' in scratch (pairs,) for the scatter.
    """
    var z_row = b * neurons
    var row = b * pairs + i
    var top = Int32(neurons - 1)
    var li = min(max(lp.unsafe_load[width=width](i), 0), top)
    var ri = min(max(rp.unsafe_load[width=width](i), 0), top)
    var zb = zp.unsafe_offset(z_row)
    var zl = zb.unsafe_gather(li)
    var zr = zb.unsafe_gather(ri)
    var d = dp.unsafe_load[width=width](i)
    var alpha = ap.unsafe_load[width=width](row)
    var beta = bp.unsafe_load[width=width](row)
    var a_new = d * alpha + zl * zr
    var b_new = d * beta + 1
    # One division for the three quotients: dividing is the slowest step of this loop.
    var inv_root = 1 / sqrt(b_new)
    var scaled = gsp.unsafe_load[width=width](row) * inv_root  # grad_sync / sqrt(beta'), and sync = a_new * inv_root
    var total_alpha = gap.unsafe_load[width=width](row) + scaled
    var total_beta = gbp.unsafe_load[width=width](row) - scaled * a_new * (0.5 * inv_root * inv_root)
    dap.unsafe_store(row, d * total_alpha)
    dbp.unsafe_store(row, d * total_beta)
    acc.unsafe_store(i, acc.unsafe_load[width=width](i) + total_alpha * alpha + total_beta * beta)
    scratch.unsafe_store(i, total_alpha)
