"""Small-batch matrix product y (B, N) = x (B, K) @ w (K, N) with float32 accumulation.

Built for the decode-sized case (B up to a few dozen), where the cost is
reading `w` once per `ROWS` rows of x. Each work item owns up to `ROWS` rows
of x and a chunk of columns. It walks down `w` `K_STEP` rows at a time and
adds their products into its rows of y, which stay in L1. Wide chunks keep
each read of `w` long and sequential, as the hardware prefetchers need.
`w` may be float32 or bfloat16; x and y are float32.

NOTE: this layout suits CPUs. On a GPU it compiles and runs but launches only
one thread per (row tile, chunk); `ops.matmul` is the better kernel there.
"""

from extensibility import (
    InputTensor,
    OutputTensor,
    get_kernel_simd_width,
    register,
)
from layout import Coord
from max.algorithm.functional import elementwise
from max.gpu.host import DeviceContext
from std.math import ceildiv
from std.utils import StaticTuple

from .checks import check_dense, check_dim

comptime ROWS = 4
comptime K_STEP = 8
# Column chunks: at least MIN_CHUNK columns (4 KB of float32 per row segment, a
# page), more when N is wide, so that a row tile splits into about CHUNKS items.
# On a 2-core AMD EPYC (AVX-512, single thread, K = N = 4096), 512-column
# chunks ran 4x slower than 1024-column ones, likely because each row step of
# a narrow chunk starts on a new page, where the prefetchers stop.
comptime MIN_CHUNK = 1024
comptime CHUNKS = 8


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
):
    """Write y[row : row + rows, start : stop]."""
    for r in range(rows):
        for c in range(start, stop):
            y[unsafe_offset=(row + r) * columns + c] = 0
    var vector_stop = start + (stop - start) // width * width
    var k = 0
    while k + K_STEP <= inner:
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
    while k < inner:
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
        y: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        x: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        w: InputTensor[rank=2, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "matvec"
        comptime assert (
            w.dtype == DType.float32 or w.dtype == DType.bfloat16
        ), "matvec: w must be float32 or bfloat16"
        var batch = x.dim_size(0)
        var inner = x.dim_size(1)
        var columns = w.dim_size(1)
        check_dim(op, "w", w, 0, inner)
        check_dim(op, "y", y, 0, batch)
        check_dim(op, "y", y, 1, columns)
        check_dense(op, "x", x)
        check_dense(op, "w", w)
        check_dense(op, "y", y)
        if batch == 0 or columns == 0:
            return
        var xp = x.unsafe_ptr()
        var wp = w.unsafe_ptr()
        var yp = y.unsafe_ptr()
        comptime width = get_kernel_simd_width[DType.float32, target]()
        var chunk = max(MIN_CHUNK, ceildiv(ceildiv(columns, CHUNKS), width) * width)

        def tile[
            simd: Int, alignment: Int = 1
        ](idx: Coord[...]) {
            var xp, var wp, var yp, var batch, var inner, var columns, var chunk
        }:
            var row = Int(idx[0].value()) * ROWS
            var start = Int(idx[1].value()) * chunk
            var stop = min(start + chunk, columns)
            var rows = min(ROWS, batch - row)
            comptime for r in range(1, ROWS + 1):
                if rows == r:
                    _chunk[w.dtype, r, width](
                        xp, wp, yp, inner, columns, row, start, stop
                    )

        elementwise[simd_width=1, target=target](
            tile, Coord(ceildiv(batch, ROWS), ceildiv(columns, chunk)), ctx
        )
