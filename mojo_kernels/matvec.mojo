"""Small-batch matrix product x (B, K) @ w (K, N) with float32 accumulation, as partial sums.

Built for the decode-sized case (B up to a few dozen), where the cost is reading `w` once per
`ROWS` rows of x. The output is y (S, B, N): slice s holds the products over the s-th of S
equal ranges of K, and the caller sums the slices (S = 1 needs no sum). Splitting K gives
every core work when N is narrow. A work item owns up to `ROWS` rows of x, a chunk of up to `CHUNK` columns and one
K range; it walks down its rows of `w` `K_STEP` at a time and adds their products into its
rows of y, which stay in L2. `w` may be float32 or bfloat16; x and y are float32.

NOTE: this layout suits CPUs. On a GPU it compiles and runs but launches only
one thread per work item; `ops.matmul` is the better kernel there.
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
from std.math import ceildiv
from std.utils import StaticTuple

from .checks import check_dense, check_dim
from .host import host_context

comptime ROWS = 8
comptime K_STEP = 8
# Columns per work item, at most: N is cut into equal chunks no wider than this. Each row step of
# a chunk reads CHUNK * 4 contiguous bytes of float32 weights. Narrow chunks stop the hardware
# prefetchers: on a 2-core AMD EPYC (one thread, K = N = 4096) 512-column chunks ran 4x slower
# than 1024-column ones.
comptime CHUNK = 4096


@always_inline
def _accumulate[
    w_dtype: DType, rows: Int, steps: Int, width: Int
](
    x: Pointer[Float32, _],
    w: Pointer[Scalar[w_dtype], _],
    y: Pointer[mut=True, Float32, _],
    inner: Int,
    columns: Int,
    row: Int,
    k: Int,
    column: Int,
):
    """Add x[row + r, k : k + steps] @ w[k : k + steps, column : column + width] to y for r < rows.
    """
    var w_rows = StaticTuple[SIMD[DType.float32, width], steps](
        fill=SIMD[DType.float32, width](0)
    )
    comptime for s in range(steps):
        w_rows[s] = w.unsafe_load[width=width]((k + s) * columns + column).cast[
            DType.float32
        ]()
    comptime for r in range(rows):
        var y_offset = (row + r) * columns + column
        var acc = y.unsafe_load[width=width](y_offset)
        comptime for s in range(steps):
            var xs = SIMD[DType.float32, width](
                x[unsafe_offset=(row + r) * inner + k + s]
            )
            acc = xs.fma(w_rows[s], acc)
        y.unsafe_store(y_offset, acc)


@always_inline
def _chunk[
    w_dtype: DType, rows: Int, width: Int
](
    x: Pointer[Float32, _],
    w: Pointer[Scalar[w_dtype], _],
    y: Pointer[mut=True, Float32, _],
    inner: Int,
    columns: Int,
    row: Int,
    start: Int,
    stop: Int,
    k_start: Int,
    k_stop: Int,
):
    """Write y[row : row + rows, start : stop] = x[rows, k_start : k_stop] @ w[k_start : k_stop, start : stop].
    """
    for r in range(rows):
        for c in range(start, stop):
            y[unsafe_offset=(row + r) * columns + c] = 0
    var vector_stop = start + (stop - start) // width * width
    var k = k_start
    while k + K_STEP <= k_stop:
        var c = start
        while c < vector_stop:
            _accumulate[w_dtype, rows, K_STEP, width](
                x, w, y, inner, columns, row, k, c
            )
            c += width
        while c < stop:
            _accumulate[w_dtype, rows, K_STEP, 1](
                x, w, y, inner, columns, row, k, c
            )
            c += 1
        k += K_STEP
    while k < k_stop:
        var c = start
        while c < vector_stop:
            _accumulate[w_dtype, rows, 1, width](x, w, y, inner, columns, row, k, c)
            c += width
        while c < stop:
            _accumulate[w_dtype, rows, 1, 1](x, w, y, inner, columns, row, k, c)
            c += 1
        k += 1


@register("matvec")
struct Matvec:
    @staticmethod
    def execute[
        target: StaticString
    ](
        y: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        x: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        w: InputTensor[rank=2, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "matvec"
        comptime assert (
            w.dtype == DType.float32 or w.dtype == DType.bfloat16
        ), "matvec: w must be float32 or bfloat16"
        var slices = y.dim_size(0)
        var batch = x.dim_size(0)
        var inner = x.dim_size(1)
        var columns = w.dim_size(1)
        check_dim(op, "w", w, 0, inner)
        check_dim(op, "y", y, 1, batch)
        check_dim(op, "y", y, 2, columns)
        check_dense(op, "x", x)
        check_dense(op, "w", w)
        check_dense(op, "y", y)
        if slices == 0 or batch == 0 or columns == 0:
            return
        var xp = x.unsafe_ptr()
        var wp = w.unsafe_ptr()
        var yp = y.unsafe_ptr()
        comptime width = get_kernel_simd_width[DType.float32, target]()
        var chunks = ceildiv(columns, CHUNK)
        var chunk = ceildiv(ceildiv(columns, chunks), width) * width
        var k_per_slice = ceildiv(inner, slices)
        var row_tiles = ceildiv(batch, ROWS)

        @always_inline
        def item(row_tile: Int, chunk_index: Int, s: Int) {
            var xp, var wp, var yp, var batch, var inner, var columns, var chunk, var k_per_slice
        }:
            var row = row_tile * ROWS
            var start = chunk_index * chunk
            var stop = min(start + chunk, columns)
            var k_start = min(s * k_per_slice, inner)
            var k_stop = min(k_start + k_per_slice, inner)
            var ys = yp.unsafe_offset(s * batch * columns)
            var rows = min(ROWS, batch - row)
            comptime for r in range(1, ROWS + 1):
                if rows == r:
                    _chunk[w.dtype, r, width](
                        xp, wp, ys, inner, columns, row, start, stop, k_start, k_stop
                    )

        comptime if target == "cpu":
            # `elementwise` would run these few, large items on one thread (see nlm.mojo).
            var items_per_tile = chunks * slices

            def task(i: Int) {var item, var items_per_tile, var slices}:
                var rest = i % items_per_tile
                item(i // items_per_tile, rest // slices, rest % slices)

            sync_parallelize(task, row_tiles * items_per_tile, host_context(ctx))
        else:

            def tile[
                simd: Int, alignment: Int = 1
            ](idx: Coord[...]) {var item}:
                item(Int(idx[0].value()), Int(idx[1].value()), Int(idx[2].value()))

            elementwise[simd_width=1, target=target](
                tile, Coord(row_tiles, chunks, slices), ctx
            )
