"""Attention of one query per (batch, head) over n keys, for decoding.

    out[b, h] = sum_j softmax_j(q[b, h] . k[b, j, h] / sqrt(dh)) v[b, j, h]

One work item per batch row and group of `HEADS` heads walks the keys once
with the running-maximum (online) softmax, in blocks of `KEY_BLOCK` keys.
Grouping heads makes each key read cover `HEADS` adjacent head rows of k
and v instead of one.

NOTE: at batch 8 over 1024 keys MAX's built-in composition (two batched
matmuls and a softmax) is faster on a 2-core CPU; the per-key dot products
end in a horizontal sum each, and the partial output goes through memory.
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
from std.math import ceildiv, exp, sqrt
from std.utils import StaticTuple

from .checks import check_dense, check_dim
from .host import host_context

comptime HEADS = 4
comptime KEY_BLOCK = 16
# Stands for -inf in the running maximum and the block padding: exp of it, less any real score, is 0.
comptime LOWEST = Float32(-3.0e38)


@always_inline
def _dot[
    width: Int
](a: Pointer[Float32, _], b: Pointer[Float32, _], a_start: Int, b_start: Int, size: Int) -> Float32:
    var acc = SIMD[DType.float32, width](0)
    var i = 0
    while i + width <= size:
        acc = a.unsafe_load[width=width](a_start + i).fma(
            b.unsafe_load[width=width](b_start + i), acc
        )
        i += width
    var total = acc.reduce_add()
    while i < size:
        total += a[unsafe_offset=a_start + i] * b[unsafe_offset=b_start + i]
        i += 1
    return total


@always_inline
def _scale_add[
    width: Int
](
    dst: Pointer[mut=True, Float32, _],
    dst_start: Int,
    dst_scale: Float32,
    v: Pointer[Float32, _],
    v_start: Int,
    v_scale: Float32,
    size: Int,
):
    """Set dst = dst * dst_scale + v * v_scale over `size` elements."""
    var i = 0
    while i + width <= size:
        var d = dst.unsafe_load[width=width](dst_start + i)
        var x = v.unsafe_load[width=width](v_start + i)
        dst.unsafe_store(
            dst_start + i,
            SIMD[DType.float32, width](v_scale).fma(x, d * dst_scale),
        )
        i += width
    while i < size:
        dst[unsafe_offset=dst_start + i] = v_scale.fma(
            v[unsafe_offset=v_start + i], dst[unsafe_offset=dst_start + i] * dst_scale
        )
        i += 1


@register("mha_single_query")
struct MhaSingleQuery:
    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        q: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        k: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        v: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "mha_single_query"
        var batch = q.dim_size(0)
        var heads = q.dim_size(1)
        var head_dim = q.dim_size(2)
        var keys = k.dim_size(1)
        check_dim(op, "k", k, 0, batch)
        check_dim(op, "k", k, 2, heads)
        check_dim(op, "k", k, 3, head_dim)
        check_dim(op, "v", v, 0, batch)
        check_dim(op, "v", v, 1, keys)
        check_dim(op, "v", v, 2, heads)
        check_dim(op, "v", v, 3, head_dim)
        check_dense(op, "q", q)
        check_dense(op, "k", k)
        check_dense(op, "v", v)
        check_dense(op, "output", output)
        if batch == 0 or heads == 0:
            return
        if keys == 0:
            raise Error(op, ": k and v contain no keys, and softmax over zero keys is undefined")
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var op_ = output.unsafe_ptr()
        var scale = 1 / sqrt(Float32(head_dim))
        comptime width = get_kernel_simd_width[DType.float32, target]()

        var groups = ceildiv(heads, HEADS)

        @always_inline
        def item(b: Int, group: Int) {
            var qp, var kp, var vp, var op_, var heads, var head_dim, var keys,
            var scale,
        }:
            var first = group * HEADS
            var count = min(HEADS, heads - first)
            comptime for c in range(1, HEADS + 1):
                if count == c:
                    _attend_heads[c, width](
                        qp, kp, vp, op_, heads, head_dim, keys, scale, b, first
                    )

        comptime if target == "cpu":
            # `elementwise` would run these few, large items on one thread (see nlm.mojo).

            def task(i: Int) {var item, var groups}:
                item(i // groups, i % groups)

            sync_parallelize(task, batch * groups, host_context(ctx))
        else:

            def attend[
                simd: Int, alignment: Int = 1
            ](idx: Coord[...]) {var item}:
                item(Int(idx[0].value()), Int(idx[1].value()))

            elementwise[simd_width=1, target=target](
                attend, Coord(batch, groups), ctx
            )


@always_inline
def _attend_heads[
    count: Int, width: Int
](
    q: Pointer[Float32, _],
    k: Pointer[Float32, _],
    v: Pointer[Float32, _],
    output: Pointer[mut=True, Float32, _],
    heads: Int,
    head_dim: Int,
    keys: Int,
    scale: Float32,
    b: Int,
    first: Int,
):
    """Write output[b, first : first + count], walking the keys once for all of those heads.

    Keys go in blocks of `KEY_BLOCK`: a block's scores are independent dot products, and its
    softmax weights come from one vector `exp`, so the running maximum and the rescaling of the
    partial output change once per block instead of once per key.
    """
    var running_max = StaticTuple[Float32, count](fill=LOWEST)
    var total = StaticTuple[Float32, count](fill=0)
    comptime for g in range(count):
        var row = (b * heads + first + g) * head_dim
        for i in range(head_dim):
            output[unsafe_offset=row + i] = 0
    var start = 0
    while start < keys:
        var block = min(KEY_BLOCK, keys - start)
        comptime for g in range(count):
            var row = (b * heads + first + g) * head_dim
            var scores = SIMD[DType.float32, KEY_BLOCK](LOWEST)
            for j in range(block):
                var key = ((b * keys + start + j) * heads + first + g) * head_dim
                scores[j] = _dot[width](q, k, row, key, head_dim) * scale
            var new_max = max(running_max[g], scores.reduce_max())
            var rescale = exp(running_max[g] - new_max)
            var weights = exp(scores - new_max)  # 0 for the padding past `block`
            running_max[g] = new_max
            total[g] = total[g] * rescale + weights.reduce_add()
            for j in range(block):
                var key = ((b * keys + start + j) * heads + first + g) * head_dim
                _scale_add[width](
                    output, row, rescale if j == 0 else 1, v, key, weights[j], head_dim
                )
        start += block
    comptime for g in range(count):
        var row = (b * heads + first + g) * head_dim
        var inverse = 1 / total[g]
        for i in range(head_dim):
            output[unsafe_offset=row + i] *= inverse
