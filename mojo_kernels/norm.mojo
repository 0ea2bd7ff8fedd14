"""Layer normalisation over the last axis and its gradient, a row at a time.

For a row x of D values with mean mu and inv_std = 1 / sqrt(var + eps) (the
biased variance), x_hat = (x - mu) * inv_std and y = x_hat * gamma + beta.
The `_silu` variants return silu(y) = y * sigmoid(y) instead of y, and their
gradient first turns the gradient on silu(y) into the one on y. Given the
gradient g on y, with d_hat = g * gamma:

    d_x     = inv_std * (d_hat - mean(d_hat) - x_hat * mean(d_hat * x_hat))
    d_gamma = sum over rows of g * x_hat
    d_beta  = sum over rows of g

Written with MAX's built-in ops the gradient is about a dozen ops, three of
them reductions over the row and two over the rows. The CTM's U-Net synapse
runs 22 layer norms per tick on 16 rows of 16 to 512 values, where each op
costs more to launch than to compute.

CPU only: the lowering keeps the composition on a GPU.
"""

from extensibility import (
    InputTensor,
    OutputTensor,
    get_kernel_simd_width,
    register,
)
from max.algorithm.functional import sync_parallelize
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.math import ceildiv, exp, sqrt

from .checks import check_dense, check_dim
from .host import host_context

# Rows of at least this many values in all give each CPU task work; below
# it one task runs them, since starting a second costs more than it saves.
comptime _VALUES_PER_TASK = 16384


@always_inline
def _row_sum[
    width: Int, squared: Bool
](a: Pointer[Float32, _], start: Int, count: Int, shift: Float32) -> Float32:
    """Sum over one row of a, or of (a - shift)^2 when `squared`."""
    var acc = SIMD[DType.float32, width](0)
    var i = 0
    while i + width <= count:
        var v = a.unsafe_load[width=width](start + i)
        comptime if squared:
            v = (v - shift) * (v - shift)
        acc += v
        i += width
    var total = acc.reduce_add()
    while i < count:
        var s = a[unsafe_offset=start + i]
        comptime if squared:
            s = (s - shift) * (s - shift)
        total += s
        i += 1
    return total


@always_inline
def _silu_grad[
    width: Int
](y: SIMD[DType.float32, width], g: SIMD[DType.float32, width]) -> SIMD[DType.float32, width]:
    """The gradient on y given the gradient g on silu(y)."""
    var s = 1 / (1 + exp(-y))
    return g * s * (1 + y * (1 - s))


@always_inline
def _row_stats[width: Int](x: Pointer[Float32, _], start: Int, size: Int, eps: Float32) -> Tuple[Float32, Float32]:
    """Return the row's mean and 1 / sqrt(biased variance + eps), the variance from centred values."""
    var scale = Float32(1) / Float32(size)
    var mean = _row_sum[width, False](x, start, size, 0) * scale
    return (mean, 1 / sqrt(_row_sum[width, True](x, start, size, mean) * scale + eps))


@always_inline
def _row_forward[
    width: Int, silu: Bool
](
    x: Pointer[Float32, _],
    gamma: Pointer[Float32, _],
    beta: Pointer[Float32, _],
    y: Pointer[mut=True, Float32, _],
    row: Int,
    size: Int,
    eps: Float32,
):
    var start = row * size
    var mean, inv_std = _row_stats[width](x, start, size, eps)
    var i = 0
    while i + width <= size:
        var out = ((x.unsafe_load[width=width](start + i) - mean) * inv_std).fma(
            gamma.unsafe_load[width=width](i), beta.unsafe_load[width=width](i)
        )
        comptime if silu:
            out = out / (1 + exp(-out))
        y.unsafe_store(start + i, out)
        i += width
    for j in range(i, size):
        var out = (x[unsafe_offset=start + j] - mean) * inv_std * gamma[unsafe_offset=j] + beta[unsafe_offset=j]
        comptime if silu:
            out = out / (1 + exp(-out))
        y[unsafe_offset=start + j] = out


@always_inline
def _row_backward[
    width: Int, silu: Bool
](
    x: Pointer[Float32, _],
    gamma: Pointer[Float32, _],
    beta: Pointer[Float32, _],
    grad: Pointer[Float32, _],
    d_x: Pointer[mut=True, Float32, _],
    sums: Pointer[mut=True, Float32, _],
    row: Int,
    size: Int,
    eps: Float32,
):
    """Write d_x of one row and add its share to d_gamma and d_beta, which
    `sums` holds one after the other.

    With `silu`, d_x first holds the gradient on y, so that the last pass
    reads it instead of recomputing the sigmoid.
    """
    var start = row * size
    var scale = Float32(1) / Float32(size)
    var mean, inv_std = _row_stats[width](x, start, size, eps)
    var sum_d = SIMD[DType.float32, width](0)  # sum of d_hat
    var sum_dx = SIMD[DType.float32, width](0)  # sum of d_hat * x_hat
    var i = 0
    while i + width <= size:
        var x_hat = (x.unsafe_load[width=width](start + i) - mean) * inv_std
        var g = grad.unsafe_load[width=width](start + i)
        var w = gamma.unsafe_load[width=width](i)
        comptime if silu:
            g = _silu_grad(x_hat.fma(w, beta.unsafe_load[width=width](i)), g)
            d_x.unsafe_store(start + i, g)
        var d_hat = g * w
        sum_d += d_hat
        sum_dx = d_hat.fma(x_hat, sum_dx)
        sums.unsafe_store(i, g.fma(x_hat, sums.unsafe_load[width=width](i)))
        sums.unsafe_store(size + i, sums.unsafe_load[width=width](size + i) + g)
        i += width
    var total_d = sum_d.reduce_add()
    var total_dx = sum_dx.reduce_add()
    for j in range(i, size):
        var x_hat = (x[unsafe_offset=start + j] - mean) * inv_std
        var g = grad[unsafe_offset=start + j]
        comptime if silu:
            g = _silu_grad[1](x_hat * gamma[unsafe_offset=j] + beta[unsafe_offset=j], g)[0]
            d_x[unsafe_offset=start + j] = g
        var d_hat = g * gamma[unsafe_offset=j]
        total_d += d_hat
        total_dx += d_hat * x_hat
        sums[unsafe_offset=j] += g * x_hat
        sums[unsafe_offset=size + j] += g
    var mean_d = total_d * scale
    var mean_dx = total_dx * scale
    i = 0
    while i + width <= size:
        var x_hat = (x.unsafe_load[width=width](start + i) - mean) * inv_std
        var g: SIMD[DType.float32, width]
        comptime if silu:
            g = d_x.unsafe_load[width=width](start + i)
        else:
            g = grad.unsafe_load[width=width](start + i)
        var d_hat = g * gamma.unsafe_load[width=width](i)
        d_x.unsafe_store(start + i, inv_std * (d_hat - mean_d - x_hat * mean_dx))
        i += width
    for j in range(i, size):
        var x_hat = (x[unsafe_offset=start + j] - mean) * inv_std
        var g: Float32
        comptime if silu:
            g = d_x[unsafe_offset=start + j]
        else:
            g = grad[unsafe_offset=start + j]
        var d_hat = g * gamma[unsafe_offset=j]
        d_x[unsafe_offset=start + j] = inv_std * (d_hat - mean_d - x_hat * mean_dx)


def _tasks(rows: Int, size: Int, ctx: DeviceContext) -> Int:
    return max(1, min(rows, min(ceildiv(rows * size, _VALUES_PER_TASK), parallelism_level(host_context(ctx)))))


def _forward[
    target: StaticString, silu: Bool
](
    op: StaticString,
    y: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
    x: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
    gamma: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
    beta: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
    eps: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
    ctx: DeviceContext,
) raises:
    comptime if target != "cpu":
        raise Error(op, ": the kernel runs on the CPU only")
    var rows = x.dim_size(0)
    var size = x.dim_size(1)
    check_dense(op, "x", x)
    check_dim(op, "gamma", gamma, 0, size)
    check_dim(op, "beta", beta, 0, size)
    check_dim(op, "eps", eps, 0, 1)
    check_dim(op, "output", y, 0, rows)
    check_dim(op, "output", y, 1, size)
    check_dense(op, "output", y)
    if rows == 0 or size == 0:
        return
    var xp = x.unsafe_ptr()
    var gp = gamma.unsafe_ptr()
    var bp = beta.unsafe_ptr()
    var yp = y.unsafe_ptr()
    var epsilon = eps.unsafe_ptr()[unsafe_offset=0]
    comptime width = get_kernel_simd_width[DType.float32, target]()
    var tasks = _tasks(rows, size, ctx)
    var chunk = ceildiv(rows, tasks)

    def task_rows(task: Int) {
        var xp, var gp, var bp, var yp, var rows, var size, var chunk, var epsilon,
    }:
        for r in range(task * chunk, min((task + 1) * chunk, rows)):
            _row_forward[width, silu](xp, gp, bp, yp, r, size, epsilon)

    if tasks == 1:
        task_rows(0)
    else:
        sync_parallelize(task_rows, tasks, host_context(ctx))


def _backward[
    target: StaticString, silu: Bool
](
    op: StaticString,
    d_x: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
    d_gamma: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
    d_beta: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
    x: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
    gamma: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
    beta: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
    grad: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
    eps: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
    ctx: DeviceContext,
) raises:
    comptime if target != "cpu":
        raise Error(op, ": the kernel runs on the CPU only")
    var rows = x.dim_size(0)
    var size = x.dim_size(1)
    check_dense(op, "x", x)
    check_dim(op, "gamma", gamma, 0, size)
    comptime if silu:
        check_dim(op, "beta", beta, 0, size)
    check_dim(op, "grad", grad, 0, rows)
    check_dim(op, "grad", grad, 1, size)
    check_dense(op, "grad", grad)
    check_dim(op, "eps", eps, 0, 1)
    check_dim(op, "d_x", d_x, 0, rows)
    check_dim(op, "d_x", d_x, 1, size)
    check_dense(op, "d_x", d_x)
    check_dim(op, "d_gamma", d_gamma, 0, size)
    check_dim(op, "d_beta", d_beta, 0, size)
    var xp = x.unsafe_ptr()
    var gp = gamma.unsafe_ptr()
    var bp = beta.unsafe_ptr()
    var gradp = grad.unsafe_ptr()
    var dxp = d_x.unsafe_ptr()
    var dgp = d_gamma.unsafe_ptr()
    var dbp = d_beta.unsafe_ptr()
    var epsilon = eps.unsafe_ptr()[unsafe_offset=0]
    comptime width = get_kernel_simd_width[DType.float32, target]()
    for j in range(size):
        dgp[unsafe_offset=j] = 0
        dbp[unsafe_offset=j] = 0
    if rows == 0 or size == 0:
        return

    # Each task sums its rows' d_gamma and d_beta into a zeroed scratch of
    # its own; the calling thread adds the scratches up afterwards.
    var tasks = _tasks(rows, size, ctx)
    var chunk = ceildiv(rows, tasks)
    var partials = List[Float32](length=tasks * 2 * size, fill=0)
    var base = partials.unsafe_ptr()

    def task_rows(task: Int) {
        var xp, var gp, var bp, var gradp, var dxp, var base, var rows,
        var size, var chunk, var epsilon,
    }:
        var own = base.unsafe_offset(task * 2 * size)
        for r in range(task * chunk, min((task + 1) * chunk, rows)):
            _row_backward[width, silu](xp, gp, bp, gradp, dxp, own, r, size, epsilon)

    if tasks == 1:
        task_rows(0)
    else:
        sync_parallelize(task_rows, tasks, host_context(ctx))
    for task in range(tasks):
        var own = base.unsafe_offset(task * 2 * size)
        for j in range(size):
            dgp[unsafe_offset=j] += own[unsafe_offset=j]
            dbp[unsafe_offset=j] += own[unsafe_offset=size + j]
    _ = partials^


@register("layer_norm")
struct LayerNorm:
    """`y` (R, D) from `x` (R, D), `gamma` (D,), `beta` (D,) and `eps` (1,)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        y: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        x: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        gamma: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        beta: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        eps: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _forward[target, False]("layer_norm", y, x, gamma, beta, eps, ctx)


@register("layer_norm_silu")
struct LayerNormSilu:
    """`silu(y)` (R, D) from the same inputs as `layer_norm`."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        y: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        x: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        gamma: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        beta: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        eps: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _forward[target, True]("layer_norm_silu", y, x, gamma, beta, eps, ctx)


@register("layer_norm_backward")
struct LayerNormBackward:
    """`d_x` (R, D), `d_gamma` (D,), `d_beta` (D,) from `x` (R, D), `gamma`
    (D,), `grad` (R, D) and `eps` (1,)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        d_x: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        d_gamma: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        d_beta: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        x: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        gamma: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        grad: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        eps: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        # gamma stands in for the beta that only the SiLU variant reads.
        _backward[target, False]("layer_norm_backward", d_x, d_gamma, d_beta, x, gamma, gamma, grad, eps, ctx)


@register("layer_norm_silu_backward")
struct LayerNormSiluBackward:
    """The gradient of `layer_norm_silu`: as `layer_norm_backward`, with
    `beta` (D,) after `gamma`."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        d_x: OutputTensor[dtype = DType.float32, rank=2, static_spec=_],
        d_gamma: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        d_beta: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        x: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        gamma: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        beta: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        grad: InputTensor[dtype = DType.float32, rank=2, static_spec=_],
        eps: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        _backward[target, True]("layer_norm_silu_backward", d_x, d_gamma, d_beta, x, gamma, beta, grad, eps, ctx)
