"""Attention kernels: each query row of each head walks its keys once.

    out[b, h] = sum_j softmax_j(q[b, h] . k[b, j, h // group] / sqrt(dh)) v[b, j, h // group]

`mha_single_query` takes k and v as (B, n, H, dh): the CTM's read of its
observation tokens. `decode_attention` reads a transformer's key/value cache as
it is stored, (L, B, H_kv, dh), plus the new token's (B, H_kv, dh), with
H / H_kv query heads sharing each key/value head (grouped-query attention).

Each work item takes one batch row and a range of heads, and walks the keys
once with the running-maximum (online) softmax, in blocks of `KEY_BLOCK`
keys. Within a block it visits every head of its range, `HEADS` at a time,
so a work item that holds all heads reads each key row of k and v as one
contiguous stretch. On the CPU a row's heads are split over items only when
there are too few rows to keep every core busy.

`causal_attention` runs every token of a sequence (B, T, H, dh) at once: query
row (b, t) walks the keys of row b up to the last one it attends to, skipping
keys at later positions.

`mha_single_query_backward` gives the gradients of `mha_single_query`: each
(batch row, head) walks its keys three times (see `_head_backward`).

NOTE: `causal_attention` takes each query row on its own, so its dot products
are vector-by-vector, not the matrix tiles of a flash-attention kernel: at
Qwen2.5-0.5B's heads over 512 tokens it took twice as long as torch's
scaled_dot_product_attention.
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
from std.math import ceildiv, exp, sqrt
from std.utils import StaticTuple

from .checks import check_dense, check_dim
from .host import host_context

comptime HEADS = 4
comptime KEY_BLOCK = 16
# Heads one CPU work item may hold; its running maxima and softmax sums live on its stack.
comptime MAX_ITEM_HEADS = 64
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
        # Key j of row b starts at b * keys * H * dh + j * H * dh; there is no new-token block.
        var rows = KeyRows(keys, keys * heads * head_dim, heads * head_dim)
        var no_rows = KeyRows(0, 0, 0)
        var no_positions = List[Int64](length=1, fill=0)  # never read: this launch is unmasked
        _launch[target](
            output.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(), rows,
            k.unsafe_ptr(), v.unsafe_ptr(), no_rows, batch, 1, heads, head_dim, 1,
            no_positions.unsafe_ptr(), ctx,
        )
        _ = no_positions^


@register("mha_single_query_backward")
struct MhaSingleQueryBackward:
    """`(d_q, d_k, d_v)` of `mha_single_query`, given the gradient of its output."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        d_q: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        d_k: OutputTensor[dtype = DType.float32, rank=4, static_spec=_],
        d_v: OutputTensor[dtype = DType.float32, rank=4, static_spec=_],
        q: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        k: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        v: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        grad: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "mha_single_query_backward"
        var batch = q.dim_size(0)
        var heads = q.dim_size(1)
        var head_dim = q.dim_size(2)
        var keys = k.dim_size(1)
        for axis in range(3):
            check_dim(op, "grad", grad, axis, q.dim_size(axis))
        check_dim(op, "k", k, 0, batch)
        check_dim(op, "k", k, 2, heads)
        check_dim(op, "k", k, 3, head_dim)
        for axis in range(4):
            check_dim(op, "v", v, axis, k.dim_size(axis))
        check_dense(op, "q", q)
        check_dense(op, "k", k)
        check_dense(op, "v", v)
        check_dense(op, "grad", grad)
        check_dense(op, "d_q", d_q)
        check_dense(op, "d_k", d_k)
        check_dense(op, "d_v", d_v)
        if batch == 0 or heads == 0:
            return
        if keys == 0:
            raise Error(op, ": k and v contain no keys, and softmax over zero keys is undefined")
        var scale = 1 / sqrt(Float32(head_dim))
        var rows = KeyRows(keys, keys * heads * head_dim, heads * head_dim)
        var dqp = d_q.unsafe_ptr()
        var dkp = d_k.unsafe_ptr()
        var dvp = d_v.unsafe_ptr()
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var gp = grad.unsafe_ptr()
        comptime width = get_kernel_simd_width[DType.float32, target]()

        comptime if target == "cpu":
            # As in the forward: whole rows when there are enough for two items per core.
            var wanted = 2 * parallelism_level(host_context(ctx))
            var item_heads = max(1, min(heads, (batch * heads) // wanted))
            var row_items = ceildiv(heads, item_heads)

            def task(i: Int) {
                var dqp, var dkp, var dvp, var qp, var kp, var vp, var gp, var rows,
                var heads, var head_dim, var scale, var item_heads, var row_items,
            }:
                var first = (i % row_items) * item_heads
                for h in range(first, min(first + item_heads, heads)):
                    _head_backward[width](
                        dqp, dkp, dvp, qp, kp, vp, gp, rows, heads, head_dim, scale, i // row_items, h,
                    )

            sync_parallelize(task, batch * row_items, host_context(ctx))
        else:

            def head_grads[
                simd: Int, alignment: Int = 1
            ](idx: Coord[...]) {
                var dqp, var dkp, var dvp, var qp, var kp, var vp, var gp, var rows,
                var heads, var head_dim, var scale,
            }:
                _head_backward[width](
                    dqp, dkp, dvp, qp, kp, vp, gp, rows, heads, head_dim, scale,
                    Int(idx[0].value()), Int(idx[1].value()),
                )

            elementwise[simd_width=1, target=target](head_grads, Coord(batch, heads), ctx)


@register("decode_attention")
struct DecodeAttention:
    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype = DType.float32, rank=3, static_spec=_],
        q: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        k: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        v: InputTensor[dtype = DType.float32, rank=3, static_spec=_],
        past_k: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        past_v: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "decode_attention"
        var batch = q.dim_size(0)
        var heads = q.dim_size(1)
        var head_dim = q.dim_size(2)
        var kv_heads = k.dim_size(1)
        var cached = past_k.dim_size(0)
        check_dim(op, "k", k, 0, batch)
        check_dim(op, "k", k, 2, head_dim)
        check_dim(op, "v", v, 0, batch)
        check_dim(op, "v", v, 1, kv_heads)
        check_dim(op, "v", v, 2, head_dim)
        check_dim(op, "past_k", past_k, 1, batch)
        check_dim(op, "past_k", past_k, 2, kv_heads)
        check_dim(op, "past_k", past_k, 3, head_dim)
        check_dim(op, "past_v", past_v, 0, cached)
        check_dim(op, "past_v", past_v, 1, batch)
        check_dim(op, "past_v", past_v, 2, kv_heads)
        check_dim(op, "past_v", past_v, 3, head_dim)
        if kv_heads == 0 or heads % kv_heads != 0:
            raise Error(op, ": q has ", heads, " heads, not a multiple of the ", kv_heads, " key/value heads")
        check_dense(op, "q", q)
        check_dense(op, "k", k)
        check_dense(op, "v", v)
        check_dense(op, "past_k", past_k)
        check_dense(op, "past_v", past_v)
        check_dense(op, "output", output)
        if batch == 0 or heads == 0:
            return
        var row = kv_heads * head_dim
        # Cached key j of row b starts at (j * B + b) * H_kv * dh; the new key at b * H_kv * dh.
        var past_rows = KeyRows(cached, row, batch * row)
        var new_rows = KeyRows(1, row, row)
        var no_positions = List[Int64](length=1, fill=0)  # never read: this launch is unmasked
        _launch[target](
            output.unsafe_ptr(), q.unsafe_ptr(), past_k.unsafe_ptr(), past_v.unsafe_ptr(), past_rows,
            k.unsafe_ptr(), v.unsafe_ptr(), new_rows, batch, 1, heads, head_dim, heads // kv_heads,
            no_positions.unsafe_ptr(), ctx,
        )
        _ = no_positions^


@register("causal_attention")
struct CausalAttention:
    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype = DType.float32, rank=4, static_spec=_],
        q: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        k: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        v: InputTensor[dtype = DType.float32, rank=4, static_spec=_],
        positions: InputTensor[dtype = DType.int64, rank=1, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "causal_attention"
        var batch = q.dim_size(0)
        var tokens = q.dim_size(1)
        var heads = q.dim_size(2)
        var head_dim = q.dim_size(3)
        var kv_heads = k.dim_size(2)
        check_dim(op, "k", k, 0, batch)
        check_dim(op, "k", k, 1, tokens)
        check_dim(op, "k", k, 3, head_dim)
        check_dim(op, "v", v, 0, batch)
        check_dim(op, "v", v, 1, tokens)
        check_dim(op, "v", v, 2, kv_heads)
        check_dim(op, "v", v, 3, head_dim)
        check_dim(op, "positions", positions, 0, tokens)
        if kv_heads == 0 or heads % kv_heads != 0:
            raise Error(op, ": q has ", heads, " heads, not a multiple of the ", kv_heads, " key/value heads")
        check_dense(op, "q", q)
        check_dense(op, "k", k)
        check_dense(op, "v", v)
        check_dense(op, "positions", positions)
        check_dense(op, "output", output)
        if batch == 0 or tokens == 0 or heads == 0:
            return
        # Query row r = b * T + t reads the keys of batch row b: key j starts at (b * T + j) * H_kv * dh.
        var row = kv_heads * head_dim
        var rows = KeyRows(tokens, tokens * row, row)
        var no_rows = KeyRows(0, 0, 0)
        _launch[target, True](
            output.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(), rows,
            k.unsafe_ptr(), v.unsafe_ptr(), no_rows, batch * tokens, tokens, heads, head_dim,
            heads // kv_heads, positions.unsafe_ptr(), ctx,
        )


@fieldwise_init
struct KeyRows(ImplicitlyCopyable, RegisterPassable):
    """Where the key rows of one source lie: key j of batch row b starts at b * batch_stride + j * key_stride."""

    var keys: Int
    var batch_stride: Int
    var key_stride: Int


def _launch[
    target: StaticString, masked: Bool = False
](
    output: Pointer[mut=True, Float32, _],
    q: Pointer[Float32, _],
    k: Pointer[Float32, _],
    v: Pointer[Float32, _],
    rows: KeyRows,
    k_new: Pointer[Float32, _],
    v_new: Pointer[Float32, _],
    new_rows: KeyRows,
    query_rows: Int,
    rows_per_batch: Int,
    heads: Int,
    head_dim: Int,
    group: Int,
    positions: Pointer[Int64, _],
    ctx: DeviceContext,
) raises:
    """Attend every (query row, head) over `rows` of k/v, then `new_rows` of k_new/v_new.

    Query row r reads the keys of batch row r // rows_per_batch. With `masked`, it attends to key j
    only where positions[j] <= positions[r % rows_per_batch], and only keys up to the last
    such j are visited.
    """
    var scale = 1 / sqrt(Float32(head_dim))
    comptime width = get_kernel_simd_width[DType.float32, target]()
    var groups = ceildiv(heads, HEADS)

    comptime if target == "cpu":
        # Whole rows when there are enough of them for two items per core, else a
        # row's head groups spread over items. `elementwise` would run these few,
        # large items on one thread (see nlm.mojo).
        var wanted = 2 * parallelism_level(host_context(ctx))
        var item_groups = max(1, min(groups, (query_rows * groups) // wanted, MAX_ITEM_HEADS // HEADS))
        var row_items = ceildiv(groups, item_groups)

        def task(i: Int) {
            var output, var q, var k, var v, var rows, var k_new, var v_new, var new_rows,
            var rows_per_batch, var heads, var head_dim, var group, var scale, var positions,
            var item_groups, var row_items,
        }:
            var first = (i % row_items) * item_groups * HEADS
            _attend_row[width, masked](
                output, q, k, v, rows, k_new, v_new, new_rows, rows_per_batch, heads, head_dim,
                group, scale, positions, i // row_items, first, min(first + item_groups * HEADS, heads),
            )

        sync_parallelize(task, query_rows * row_items, host_context(ctx))
    else:

        def attend[
            simd: Int, alignment: Int = 1
        ](idx: Coord[...]) {
            var output, var q, var k, var v, var rows, var k_new, var v_new, var new_rows,
            var rows_per_batch, var heads, var head_dim, var group, var scale, var positions,
        }:
            var first = Int(idx[1].value()) * HEADS
            _attend_row[width, masked](
                output, q, k, v, rows, k_new, v_new, new_rows, rows_per_batch, heads, head_dim,
                group, scale, positions, Int(idx[0].value()), first, min(first + HEADS, heads),
            )

        elementwise[simd_width=1, target=target](attend, Coord(query_rows, groups), ctx)


@always_inline
def _attend_row[
    width: Int, masked: Bool
](
    output: Pointer[mut=True, Float32, _],
    q: Pointer[Float32, _],
    k: Pointer[Float32, _],
    v: Pointer[Float32, _],
    rows: KeyRows,
    k_new: Pointer[Float32, _],
    v_new: Pointer[Float32, _],
    new_rows: KeyRows,
    rows_per_batch: Int,
    heads: Int,
    head_dim: Int,
    group: Int,
    scale: Float32,
    positions: Pointer[Int64, _],
    r: Int,
    head_start: Int,
    head_stop: Int,
):
    """Write output[r, head_start:head_stop] (at most `MAX_ITEM_HEADS` heads), walking the keys once."""
    var running_max = StaticTuple[Float32, MAX_ITEM_HEADS](fill=LOWEST)
    var total = StaticTuple[Float32, MAX_ITEM_HEADS](fill=0)
    for h in range(head_start, head_stop):
        var row = (r * heads + h) * head_dim
        for i in range(head_dim):
            output[unsafe_offset=row + i] = 0
    var b = r // rows_per_batch
    var query_pos = Int64(0)
    var visible = rows
    comptime if masked:
        query_pos = positions[unsafe_offset=r % rows_per_batch]
        var last = -1
        for j in range(rows.keys):
            if positions[unsafe_offset=j] <= query_pos:
                last = j
        visible.keys = last + 1
    _attend_source[width, masked](
        output, q, k, v, visible, heads, head_dim, group, scale, r, b, head_start, head_stop,
        positions, query_pos, running_max, total,
    )
    _attend_source[width, False](
        output, q, k_new, v_new, new_rows, heads, head_dim, group, scale, r, b, head_start, head_stop,
        positions, query_pos, running_max, total,
    )
    for h in range(head_start, head_stop):
        var row = (r * heads + h) * head_dim
        var inverse = 1 / total[h - head_start]
        for i in range(head_dim):
            output[unsafe_offset=row + i] *= inverse


@always_inline
def _attend_source[
    width: Int, masked: Bool
](
    output: Pointer[mut=True, Float32, _],
    q: Pointer[Float32, _],
    k: Pointer[Float32, _],
    v: Pointer[Float32, _],
    rows: KeyRows,
    heads: Int,
    head_dim: Int,
    group: Int,
    scale: Float32,
    r: Int,
    b: Int,
    head_start: Int,
    head_stop: Int,
    positions: Pointer[Int64, _],
    query_pos: Int64,
    mut running_max: StaticTuple[Float32, MAX_ITEM_HEADS],
    mut total: StaticTuple[Float32, MAX_ITEM_HEADS],
):
    """Fold every key of one source into the partial outputs of heads head_start : head_stop."""
    var start = 0
    while start < rows.keys:
        var block = min(KEY_BLOCK, rows.keys - start)
        var first = head_start
        while first < head_stop:
            var count = min(HEADS, head_stop - first)
            comptime for c in range(1, HEADS + 1):
                if count == c:
                    _attend_block[c, width, masked](
                        output, q, k, v, rows, heads, head_dim, group, scale, r, b, first,
                        start, block, positions, query_pos, running_max, total, first - head_start,
                    )
            first += HEADS
        start += block


@always_inline
def _attend_block[
    count: Int, width: Int, masked: Bool
](
    output: Pointer[mut=True, Float32, _],
    q: Pointer[Float32, _],
    k: Pointer[Float32, _],
    v: Pointer[Float32, _],
    rows: KeyRows,
    heads: Int,
    head_dim: Int,
    group: Int,
    scale: Float32,
    r: Int,
    b: Int,
    first: Int,
    start: Int,
    block: Int,
    positions: Pointer[Int64, _],
    query_pos: Int64,
    mut running_max: StaticTuple[Float32, MAX_ITEM_HEADS],
    mut total: StaticTuple[Float32, MAX_ITEM_HEADS],
    slot: Int,
):
    """Fold keys start : start + block into the partial outputs of heads first : first + count.

    A block's scores are independent dot products and its softmax weights come from one vector
    `exp`, so the running maximum and the rescaling of the partial output change once per block.
    Each `width`-wide slice of the output stays in a register across the block's keys. A masked
    key gets the weight 0 even when no key before it was visible.
    """
    var hidden = SIMD[DType.bool, KEY_BLOCK](fill=False)
    comptime if masked:
        for j in range(block):
            hidden[j] = positions[unsafe_offset=start + j] > query_pos
    comptime for g in range(count):
        var row = (r * heads + first + g) * head_dim
        var key0 = b * rows.batch_stride + start * rows.key_stride + ((first + g) // group) * head_dim
        var scores = SIMD[DType.float32, KEY_BLOCK](LOWEST)
        for j in range(block):
            scores[j] = _dot[width](q, k, row, key0 + j * rows.key_stride, head_dim) * scale
        comptime if masked:
            scores = hidden.select(SIMD[DType.float32, KEY_BLOCK](LOWEST), scores)
        var old_max = running_max[slot + g]
        var new_max = max(old_max, scores.reduce_max())
        var rescale = exp(old_max - new_max)
        var weights = exp(scores - new_max)  # 0 for the padding past `block`
        comptime if masked:
            weights = hidden.select(SIMD[DType.float32, KEY_BLOCK](0), weights)
        running_max[slot + g] = new_max
        total[slot + g] = total[slot + g] * rescale + weights.reduce_add()
        var i = 0
        while i + width <= head_dim:
            var acc = output.unsafe_load[width=width](row + i) * rescale
            for j in range(block):
                acc = SIMD[DType.float32, width](weights[j]).fma(
                    v.unsafe_load[width=width](key0 + j * rows.key_stride + i), acc
                )
            output.unsafe_store(row + i, acc)
            i += width
        while i < head_dim:
            var acc = output[unsafe_offset=row + i] * rescale
            for j in range(block):
                acc = weights[j].fma(v[unsafe_offset=key0 + j * rows.key_stride + i], acc)
            output[unsafe_offset=row + i] = acc
            i += 1


# --------------------------------------------------------------------------------------------
# Backward of the single-query attention


@always_inline
def _block_dots[
    width: Int
](
    a: Pointer[Float32, _],
    rows: Pointer[Float32, _],
    a_start: Int,
    first: Int,
    key_stride: Int,
    size: Int,
    block: Int,
    factor: Float32,
    padding: Float32,
) -> SIMD[DType.float32, KEY_BLOCK]:
    """Return factor * (a . row j) for the `block` rows from `first` on, `padding` past them."""
    var dots = SIMD[DType.float32, KEY_BLOCK](padding)
    for j in range(block):
        dots[j] = _dot[width](a, rows, a_start, first + j * key_stride, size) * factor
    return dots


@always_inline
def _scaled_row[
    width: Int
](
    dst: Pointer[mut=True, Float32, _],
    src: Pointer[Float32, _],
    dst_start: Int,
    src_start: Int,
    size: Int,
    factor: Float32,
):
    """Write dst[dst_start + i] = factor * src[src_start + i] for i < size."""
    var i = 0
    while i + width <= size:
        dst.unsafe_store(dst_start + i, src.unsafe_load[width=width](src_start + i) * factor)
        i += width
    while i < size:
        dst[unsafe_offset=dst_start + i] = src[unsafe_offset=src_start + i] * factor
        i += 1


@always_inline
def _head_backward[
    width: Int
](
    d_q: Pointer[mut=True, Float32, _],
    d_k: Pointer[mut=True, Float32, _],
    d_v: Pointer[mut=True, Float32, _],
    q: Pointer[Float32, _],
    k: Pointer[Float32, _],
    v: Pointer[Float32, _],
    grad: Pointer[Float32, _],
    rows: KeyRows,
    heads: Int,
    head_dim: Int,
    scale: Float32,
    b: Int,
    h: Int,
):
    """Write d_q[b, h] and d_k, d_v[b, :, h] in three passes over the keys, `KEY_BLOCK` at a time.

    With p the softmax weights and dp_j = grad . v_j: the first pass finds the softmax's
    maximum and sum, the second writes d_v_j = p_j grad and sums p . dp, and the third
    writes d_k_j = ds_j q and sums d_q = sum_j ds_j k_j, where ds_j = p_j (dp_j - p . dp) / sqrt(dh).
    The passes recompute the dh-long dot products instead of keeping n of them per head.
    """
    var row = (b * heads + h) * head_dim
    var key0 = b * rows.batch_stride + h * head_dim
    var top = LOWEST
    var total = Float32(0)
    var start = 0
    while start < rows.keys:
        var block = min(KEY_BLOCK, rows.keys - start)
        var scores = _block_dots[width](q, k, row, key0 + start * rows.key_stride, rows.key_stride, head_dim, block, scale, LOWEST)
        var new_top = max(top, scores.reduce_max())
        total = total * exp(top - new_top) + exp(scores - new_top).reduce_add()
        top = new_top
        start += block
    var inverse = 1 / total

    var p_dot_dp = Float32(0)
    start = 0
    while start < rows.keys:
        var block = min(KEY_BLOCK, rows.keys - start)
        var first = key0 + start * rows.key_stride
        var p = exp(_block_dots[width](q, k, row, first, rows.key_stride, head_dim, block, scale, LOWEST) - top) * inverse
        var dp = _block_dots[width](grad, v, row, first, rows.key_stride, head_dim, block, 1, 0)
        p_dot_dp += (p * dp).reduce_add()
        for j in range(block):
            _scaled_row[width](d_v, grad, first + j * rows.key_stride, row, head_dim, p[j])
        start += block

    for i in range(head_dim):
        d_q[unsafe_offset=row + i] = 0
    start = 0
    while start < rows.keys:
        var block = min(KEY_BLOCK, rows.keys - start)
        var first = key0 + start * rows.key_stride
        var p = exp(_block_dots[width](q, k, row, first, rows.key_stride, head_dim, block, scale, LOWEST) - top) * inverse
        var dp = _block_dots[width](grad, v, row, first, rows.key_stride, head_dim, block, 1, 0)
        var ds = p * (dp - p_dot_dp) * scale  # 0 past `block`, where p is 0
        for j in range(block):
            _scaled_row[width](d_k, q, first + j * rows.key_stride, row, head_dim, ds[j])
        var i = 0
        while i + width <= head_dim:
            var acc = d_q.unsafe_load[width=width](row + i)
            for j in range(block):
                acc = SIMD[DType.float32, width](ds[j]).fma(k.unsafe_load[width=width](first + j * rows.key_stride + i), acc)
            d_q.unsafe_store(row + i, acc)
            i += width
        while i < head_dim:
            var acc = d_q[unsafe_offset=row + i]
            for j in range(block):
                acc = ds[j].fma(k[unsafe_offset=first + j * rows.key_stride + i], acc)
            d_q[unsafe_offset=row + i] = acc
            i += 1
        start += block
