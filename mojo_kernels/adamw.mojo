"""Fused AdamW step on flat float32 buffers, in torch.optim.AdamW's operation order.

`hyper` holds eight float32 coefficients, computed on the host side in
float64 as torch does, so that one compiled graph serves every step and
schedule: [clip_scale, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay,
lr / (1 - beta1**step), sqrt(1 - beta2**step), eps]. With g = grad * clip_scale:

    m' = m + (1 - beta1) * (g - m)
    v' = beta2 * v + (1 - beta2) * g * g
    p' = p * (1 - lr * weight_decay)
         - (lr / (1 - beta1**step)) * m' / (sqrt(v') / sqrt(1 - beta2**step) + eps)
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
from std.math import sqrt

from .checks import check_dim

comptime HYPER_SIZE = 8


@register("adamw_fused")
struct AdamwFused:
    @staticmethod
    def execute[
        target: StaticString
    ](
        param_out: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        m_out: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        v_out: OutputTensor[dtype = DType.float32, rank=1, static_spec=_],
        param: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        grad: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        m: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        v: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        hyper: InputTensor[dtype = DType.float32, rank=1, static_spec=_],
        ctx: DeviceContext,
    ) raises:
        comptime op = "adamw_fused"
        var size = param.dim_size(0)
        check_dim(op, "grad", grad, 0, size)
        check_dim(op, "m", m, 0, size)
        check_dim(op, "v", v, 0, size)
        check_dim(op, "hyper", hyper, 0, HYPER_SIZE)
        if size == 0:
            return
        var pp = param.unsafe_ptr()
        var gp = grad.unsafe_ptr()
        var mp = m.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var hp = hyper.unsafe_ptr()
        var po = param_out.unsafe_ptr()
        var mo = m_out.unsafe_ptr()
        var vo = v_out.unsafe_ptr()

        def step[
            width: Int, alignment: Int = 1
        ](idx: Coord[...]) {var pp, var gp, var mp, var vp, var hp, var po, var mo, var vo}:
            comptime Vec = SIMD[DType.float32, width]
            var i = Int(idx[0].value())
            var clip_scale = hp[unsafe_offset=0]
            var one_minus_beta1 = hp[unsafe_offset=1]
            var beta2 = hp[unsafe_offset=2]
            var one_minus_beta2 = hp[unsafe_offset=3]
            var decay_factor = hp[unsafe_offset=4]
            var step_size = hp[unsafe_offset=5]
            var root_correction2 = hp[unsafe_offset=6]
            var eps = hp[unsafe_offset=7]

            var g = gp.unsafe_load[width=width](i) * clip_scale
            var m_old = mp.unsafe_load[width=width](i)
            var m_new = m_old + Vec(one_minus_beta1) * (g - m_old)
            var v_new = vp.unsafe_load[width=width](i) * beta2 + Vec(
                one_minus_beta2
            ) * (g * g)
            var p = pp.unsafe_load[width=width](i) * decay_factor
            var denom = sqrt(v_new) / root_correction2 + eps
            po.unsafe_store(i, p - Vec(step_size) * (m_new / denom))
            mo.unsafe_store(i, m_new)
            vo.unsafe_store(i, v_new)

        comptime width = get_kernel_simd_width[DType.float32, target]()
        elementwise[simd_width=width, target=target](step, Coord(size), ctx)
