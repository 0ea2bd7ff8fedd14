"""Every engine primitive and composite op, run eagerly on numpy, against torch.

Each case is one op written twice: with modgrad ops and with torch. The forward check compares
outputs; the VJP check compares d(sum_k <out_k, g_k>)/d(inputs) from ``mg.value_and_grad``
with ``torch.autograd.grad`` for random cotangents g_k. Every case runs at sizes 1, 3, 59, 96,
98 and 224 (a single element, odd sizes, and sizes on and off a multiple of the SIMD width).

Tolerances: float64 uses rtol=1e-9, atol=1e-12 against torch in float64. float32 results are
compared with torch run in float64 on the same (float32-representable) inputs, so the check
measures our rounding error and not torch's. Dtypes and shapes still come from torch in float32.
float32 uses rtol=1e-5 and atol=1e-6 times the largest magnitude in the expected array (at least
1). The scaled atol covers results that sum many terms (matmul, reductions and their VJPs), whose
float32 error is about sqrt(n) * eps32 * sum|terms| and so follows the size of the terms, not of
each output element.

The hypothesis tests check the shape rules (broadcasting, reshape, transpose, concat, slicing,
take) against numpy on drawn shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import modgrad as mg
from modgrad import ops
from modgrad.engine.core import PRIMITIVES, ShapeError, Trace, Value, bind, trace_scope
from modgrad.engine.prims import attention as at
from modgrad.engine.prims import elementwise as ew
from modgrad.engine.prims import fused as fu
from modgrad.engine.prims import norm
from modgrad.engine.prims import reduce as red
from modgrad.engine.prims import shape as sh

SIZES = (1, 3, 59, 96, 98, 224)
DTYPES = (np.float64, np.float32)
RTOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-5}
ATOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6}


# --------------------------------------------------------------------------------------------
# Input makers: (rng, shape, dtype) -> array


def normal(scale: float = 1.0):
    return lambda rng, shape, dtype: (scale * rng.standard_normal(shape)).astype(dtype)


def positive(rng, shape, dtype):
    return rng.uniform(0.5, 2.0, shape).astype(dtype)


def nonzero(rng, shape, dtype):
    """Magnitudes in [0.5, 2] with random signs, for abs/sign/div where 0 is a kink or a pole."""
    return (rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)


def rounded(rng, shape, dtype):
    """Small integers as floats, so comparisons and max see many ties."""
    return np.round(2.0 * rng.standard_normal(shape)).astype(dtype)


def boolean(rng, shape, dtype):
    return rng.random(shape) < 0.5


def other_float(dtype) -> np.dtype:
    return np.dtype(np.float32) if np.dtype(dtype) == np.float64 else np.dtype(np.float64)


def torch_other_float(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float64 else torch.float64


# --------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    """One op in modgrad and in torch, with the inputs to run it on at size n."""

    name: str
    ours: Callable  # arrays -> array or tuple of arrays, written with modgrad ops only
    ref: Callable  # tensors -> tensor or tuple of tensors
    inputs: Callable[[np.random.Generator, int, np.dtype], list[np.ndarray]]
    prim: str | None = None  # the primitive this case must record; None for composite ops
    differentiable: bool = True  # False when no input is a float of the test dtype
    f32_atol: float = 1e-6


def unary(name, ours, ref, make=normal(), prim=None):
    return Case(name, ours, ref, lambda r, n, d: [make(r, (2, n), d)], prim or name)


def binary(name, ours, ref, x_shape, y_shape, make_x=normal(), make_y=normal(), prim=None, **kw):
    return Case(
        name, ours, ref, lambda r, n, d: [make_x(r, x_shape(n), d), make_y(r, y_shape(n), d)], prim or name, **kw
    )


def scan_ours(h0, xs, a):
    def body(h, x):
        h = ops.tanh(ops.add(ops.mul(h, a), x))
        return h, ops.mul(h, 2.0)

    return mg.scan(body, h0, xs)


def scan_ref(h0, xs, a):
    h, ys = h0, []
    for x in xs:
        h = torch.tanh(h * a + x)
        ys.append(h * 2.0)
    return h, torch.stack(ys)


def scan_reverse_ours(h0, xs, a):
    def body(h, x):
        h = ops.sin(ops.add(ops.mul(h, a), x))
        return h, ops.exp(ops.neg(h))

    return mg.scan(body, h0, xs, reverse=True)


def scan_reverse_ref(h0, xs, a):
    h, ys = h0, [None] * len(xs)
    for t in reversed(range(len(xs))):
        h = torch.sin(h * a + xs[t])
        ys[t] = torch.exp(-h)
    return h, torch.stack(ys)


def take_add_inputs(rng, n, dtype):
    idx = rng.integers(0, n, 6)
    idx[0] = n - 1  # take_add's output size is read back as idx.max() + 1 == n
    idx[1] = idx[2]  # a repeated index must accumulate
    return [normal()(rng, (2, 6, 3), dtype), idx]


def take_add_ours(g, idx):
    return bind(sh.take_add_p, g, idx, axis=1, size=int(np.max(idx)) + 1)


def take_add_ref(g, idx):
    size = int(idx.max()) + 1
    return torch.zeros(2, size, 3, dtype=g.dtype).index_add(1, idx, g)


PRIMITIVE_CASES = [
    # Unary maps
    unary("neg", ops.neg, torch.neg),
    unary("exp", ops.exp, torch.exp, normal(2.0)),
    unary("log", ops.log, torch.log, positive),
    unary("tanh", ops.tanh, torch.tanh, normal(3.0)),
    unary("sigmoid", ops.sigmoid, torch.sigmoid, normal(20.0)),  # wide range: exp must not overflow
    unary("sqrt", ops.sqrt, torch.sqrt, positive),
    unary("rsqrt", ops.rsqrt, torch.rsqrt, positive),
    unary("abs", ops.abs, torch.abs, nonzero),
    unary("sign", lambda x: bind(ew.sign_p, x), torch.sign, nonzero),
    unary("sin", ops.sin, torch.sin, normal(3.0)),
    unary("cos", ops.cos, torch.cos, normal(3.0)),
    unary("floor", lambda x: bind(ew.floor_p, x), torch.floor, normal(3.0)),
    unary("identity", lambda x: bind(ew.identity_p, x), lambda x: x.clone()),
    unary("stop_gradient", lambda x: ops.mul(x, ops.stop_gradient(x)), lambda x: x * x.detach()),
    # Broadcasting binary arithmetic
    binary("add", ops.add, torch.add, lambda n: (3, n), lambda n: (n,)),
    binary("sub", ops.sub, torch.sub, lambda n: (n, 1), lambda n: (2, 1, 4)),
    binary("mul", ops.mul, torch.mul, lambda n: (2, n), lambda n: (2, n)),
    binary("div", ops.div, torch.div, lambda n: (n, 3), lambda n: (n, 1), make_y=nonzero),
    binary("pow", ops.pow, torch.pow, lambda n: (2, n), lambda n: (n,), make_x=positive),
    Case("pow_integer_exponent", lambda x: ops.pow(x, 3.0), lambda x: torch.pow(x, 3.0),
         lambda r, n, d: [normal()(r, (2, n), d)], "pow"),
    binary("maximum", ops.maximum, torch.maximum, lambda n: (2, n), lambda n: (n,)),
    binary("minimum", ops.minimum, torch.minimum, lambda n: (n, 2), lambda n: (n, 1)),
    # Comparisons and logic: bool outputs, so the VJP check expects zero gradients
    binary("greater", ops.greater, torch.gt, lambda n: (2, n), lambda n: (n,)),
    binary("greater_equal", ops.greater_equal, torch.ge, lambda n: (2, n), lambda n: (n,), rounded, rounded),
    binary("less_equal", lambda x, y: bind(ew.less_equal_p, x, y), torch.le,
           lambda n: (2, n), lambda n: (n,), rounded, rounded),
    binary("equal", ops.equal, torch.eq, lambda n: (2, n), lambda n: (n,), rounded, rounded),
    binary("not_equal", lambda x, y: bind(ew.not_equal_p, x, y), torch.ne,
           lambda n: (2, n), lambda n: (n,), rounded, rounded),
    binary("logical_and", lambda x, y: bind(ew.logical_and_p, x, y), torch.logical_and,
           lambda n: (2, n), lambda n: (n,), boolean, boolean, differentiable=False),
    binary("logical_or", lambda x, y: bind(ew.logical_or_p, x, y), torch.logical_or,
           lambda n: (2, n), lambda n: (n,), boolean, boolean, differentiable=False),
    Case("logical_not", lambda b: bind(ew.logical_not_p, b), torch.logical_not,
         lambda r, n, d: [boolean(r, (2, n), d)], "logical_not", differentiable=False),
    Case("where", ops.where, torch.where,
         lambda r, n, d: [boolean(r, (n,), d), normal()(r, (3, n), d), normal()(r, (3, 1), d)], "where"),
    Case("cast", lambda x: ops.cast(x, other_float(ops.dtype_of(x))), lambda x: x.to(torch_other_float(x.dtype)),
         lambda r, n, d: [normal()(r, (2, n), d)], "cast"),
    Case("cast_to_int", lambda x: ops.cast(x, np.int64), lambda x: x.to(torch.int64),
         lambda r, n, d: [normal(5.0)(r, (2, n), d)], "cast"),
    # Reductions
    Case("reduce_sum", lambda x: ops.sum(x, axis=1), lambda x: torch.sum(x, dim=1),
         lambda r, n, d: [normal()(r, (3, n), d)], "reduce_sum"),
    Case("reduce_sum_keepdims", lambda x: ops.sum(x, axis=(0, 2), keepdims=True),
         lambda x: torch.sum(x, dim=(0, 2), keepdim=True),
         lambda r, n, d: [normal()(r, (2, n, 3), d)], "reduce_sum"),
    Case("reduce_sum_all", ops.sum, torch.sum, lambda r, n, d: [normal()(r, (n, 3), d)], "reduce_sum",
         ),
    Case("reduce_max", lambda x: ops.max(x, axis=0), lambda x: torch.amax(x, dim=0),
         lambda r, n, d: [normal()(r, (n, 4), d)], "reduce_max"),
    Case("reduce_max_all", ops.max, torch.amax, lambda r, n, d: [normal()(r, (2, n), d)], "reduce_max"),
    # torch.amax splits the gradient equally between tied maxima, and reduce_max must match it.
    Case("reduce_max_ties", lambda x: ops.max(x, axis=1), lambda x: torch.amax(x, dim=1),
         lambda r, n, d: [rounded(r, (4, n), d)], "reduce_max"),
    Case("argmax", lambda x: ops.argmax(x, axis=0), lambda x: torch.argmax(x, dim=0),
         lambda r, n, d: [normal()(r, (n, 5), d)], "argmax"),
    Case("size_of", lambda x: bind(red.size_of_p, x, axes=(0, 1), dtype=ops.dtype_of(x)),
         lambda x: torch.tensor(x.shape[0] * x.shape[1], dtype=x.dtype),
         lambda r, n, d: [normal()(r, (n, 3, 2), d)], "size_of"),
    # Matrix multiplication
    Case("matmul", ops.matmul, torch.matmul,
         lambda r, n, d: [normal()(r, (2, n, 7), d), normal()(r, (7, n), d)], "matmul"),
    Case("matmul_vector", ops.matmul, torch.matmul,
         lambda r, n, d: [normal()(r, (n,), d), normal()(r, (n, 3), d)], "matmul"),
    Case("matmul_broadcast_batch", ops.matmul, torch.matmul,
         lambda r, n, d: [normal()(r, (2, 1, n, 3), d), normal()(r, (4, 3, 5), d)], "matmul"),
    # Shapes
    Case("reshape", lambda x: ops.reshape(x, (-1, 6)), lambda x: x.reshape(-1, 6),
         lambda r, n, d: [normal()(r, (2, n, 3), d)], "reshape"),
    Case("transpose", lambda x: ops.transpose(x, (2, 0, 1)), lambda x: x.permute(2, 0, 1),
         lambda r, n, d: [normal()(r, (2, n, 3), d)], "transpose"),
    Case("broadcast_to", lambda x: ops.broadcast_to(x, (2, ops.shape_of(x)[0], 4)),
         lambda x: torch.broadcast_to(x, (2, x.shape[0], 4)),
         lambda r, n, d: [normal()(r, (n, 1), d)], "broadcast_to"),
    Case("concat", lambda a, b, c: ops.concat([a, b, c], axis=1), lambda a, b, c: torch.cat([a, b, c], dim=1),
         lambda r, n, d: [normal()(r, (2, n), d), normal()(r, (2, 3), d), normal()(r, (2, 1), d)], "concat"),
    Case("slice", lambda x: ops.slice_axis(x, 1, 1, ops.shape_of(x)[1] - 1), lambda x: x[:, 1:-1],
         lambda r, n, d: [normal()(r, (3, n + 2), d)], "slice"),
    Case("take", lambda x, idx: ops.gather(x, idx, axis=0), lambda x, idx: torch.index_select(x, 0, idx),
         lambda r, n, d: [normal()(r, (n, 4), d), r.integers(0, n, 7)], "take"),
    Case("take_negative_2d_indices", lambda x, idx: ops.gather(x, idx, axis=1), lambda x, idx: x[:, idx],
         lambda r, n, d: [normal()(r, (3, n), d), r.integers(-n, n, (2, 5))], "take"),
    Case("take_add", take_add_ours, take_add_ref, take_add_inputs, "take_add"),
    # Loops
    Case("scan", scan_ours, scan_ref,
         lambda r, n, d: [normal()(r, (2, n), d), normal()(r, (5, 2, n), d), normal(0.5)(r, (n,), d)], "scan"),
    Case("scan_reverse", scan_reverse_ours, scan_reverse_ref,
         lambda r, n, d: [normal()(r, (2, n), d), normal()(r, (4, 2, n), d), normal(0.5)(r, (n,), d)], "scan"),
]


def gather_repeated_inputs(rng, n, dtype):
    idx = rng.integers(0, n, 8)
    idx[:3] = idx[3]
    return [normal()(rng, (3, n), dtype), idx]


COMPOSITE_CASES = [
    Case("softmax", ops.softmax, lambda x: torch.softmax(x, -1), lambda r, n, d: [normal(3.0)(r, (3, n), d)]),
    Case("softmax_axis0", lambda x: ops.softmax(x, 0), lambda x: torch.softmax(x, 0),
         lambda r, n, d: [normal(3.0)(r, (n, 3), d)]),
    Case("log_softmax", ops.log_softmax, lambda x: torch.log_softmax(x, -1),
         lambda r, n, d: [normal(3.0)(r, (3, n), d)]),
    Case("logsumexp", ops.logsumexp, lambda x: torch.logsumexp(x, -1),
         lambda r, n, d: [normal(3.0)(r, (3, n), d)]),
    Case("logsumexp_axis0_keepdims", lambda x: ops.logsumexp(x, 0, keepdims=True),
         lambda x: torch.logsumexp(x, 0, keepdim=True), lambda r, n, d: [normal(30.0)(r, (n, 2), d)],
         ),
    Case("layer_norm_broadcast_gamma", ops.layer_norm,
         lambda x, g, b: F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5) * g + b,
         lambda r, n, d: [normal(2.0)(r, (3, n), d), normal()(r, (3, 1), d), normal()(r, (n,), d)]),
    Case("layer_norm_broadcast_gamma_silu", lambda x, g, b: ops.layer_norm(x, g, b, activation="silu"),
         lambda x, g, b: F.silu(F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5) * g + b),
         lambda r, n, d: [normal(2.0)(r, (3, n), d), normal()(r, (3, 1), d), normal()(r, (n,), d)]),
    Case("rms_norm", ops.rms_norm, lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps=1e-6),
         lambda r, n, d: [normal(2.0)(r, (3, n), d), normal()(r, (n,), d)]),
    Case("glu", ops.glu, lambda x: F.glu(x, -1), lambda r, n, d: [normal()(r, (3, 2 * n), d)]),
    Case("glu_axis0", lambda x: ops.glu(x, 0), lambda x: F.glu(x, 0), lambda r, n, d: [normal()(r, (2 * n, 3), d)]),
    Case("mean", ops.mean, torch.mean, lambda r, n, d: [normal()(r, (n, 3), d)]),
    Case("mean_axis0_keepdims", lambda x: ops.mean(x, 0, keepdims=True), lambda x: torch.mean(x, 0, keepdim=True),
         lambda r, n, d: [normal()(r, (n, 3), d)]),
    Case("var", lambda x: ops.var(x, -1), lambda x: torch.var(x, -1, correction=0),
         lambda r, n, d: [normal(2.0)(r, (3, n), d)]),
    Case("var_all", ops.var, lambda x: torch.var(x, correction=0), lambda r, n, d: [normal()(r, (n, 4), d)],
         ),
    Case("getitem_step", lambda x: ops.getitem(x, (Ellipsis, slice(1, None, 3))), lambda x: x[..., 1::3],
         lambda r, n, d: [normal()(r, (3, n), d)]),
    Case("getitem_negative_step", lambda x: ops.getitem(x, (slice(None, None, -2), 0)),
         lambda x: x.flip(0)[::2, 0], lambda r, n, d: [normal()(r, (n, 3), d)]),
    Case("getitem_int_and_slice", lambda x: ops.getitem(x, (-1, slice(2, None))), lambda x: x[-1, 2:],
         lambda r, n, d: [normal()(r, (n, 5), d)]),
    Case("gather_repeated", lambda x, idx: ops.gather(x, idx, axis=1), lambda x, idx: torch.index_select(x, 1, idx),
         gather_repeated_inputs),
    Case("one_hot", lambda ids: ops.one_hot(ids, 5), lambda ids: F.one_hot(ids, 5).to(torch.float32),
         lambda r, n, d: [r.integers(0, 5, (n,))], differentiable=False),
    Case("clip", lambda x: ops.clip(x, -0.5, 0.5), lambda x: torch.clamp(x, -0.5, 0.5),
         lambda r, n, d: [normal()(r, (3, n), d)]),
    Case("relu", ops.relu, torch.relu, lambda r, n, d: [nonzero(r, (3, n), d)]),
    Case("square", ops.square, torch.square, lambda r, n, d: [normal()(r, (3, n), d)]),
    Case("min", lambda x: ops.min(x, axis=1), lambda x: torch.amin(x, dim=1), lambda r, n, d: [normal()(r, (3, n), d)]),
    Case("stack", lambda x, y: ops.stack([x, y], axis=1), lambda x, y: torch.stack([x, y], dim=1),
         lambda r, n, d: [normal()(r, (n, 2), d), normal()(r, (n, 2), d)]),
    Case("expand_squeeze", lambda x: ops.squeeze(ops.mul(ops.expand_dims(x, 1), 2.0), 1), lambda x: x * 2.0,
         lambda r, n, d: [normal()(r, (n, 2), d)]),
    Case("swapaxes", lambda x: ops.swapaxes(x, 0, 2), lambda x: x.transpose(0, 2),
         lambda r, n, d: [normal()(r, (n, 2, 3), d)]),
    Case("where_scalar_branch", lambda c, x: ops.where(c, x, 0.0), lambda c, x: torch.where(c, x, 0.0),
         lambda r, n, d: [boolean(r, (2, n), d), normal()(r, (2, n), d)]),
]

def nlm_glu_inputs(rng, n, dtype):
    """n neurons, 3 batch rows, a window of 4 and H = 2."""
    return [normal()(rng, (n, 3, 4), dtype), normal(0.5)(rng, (n, 4, 4), dtype), normal()(rng, (n, 4), dtype)]


def nlm_glu_ref(trace, w, b):
    return torch.nn.functional.glu(torch.bmm(trace, w) + b[:, None, :], dim=-1)


def nlm_glu_backward_ours(trace, w, b, grad):
    return tuple(bind(fu.nlm_glu_backward_p, trace, w, b, grad))


def nlm_glu_backward_ref(trace, w, b, grad):
    with torch.enable_grad():  # the forward checks run the references under no_grad
        inputs = [x.detach().requires_grad_() for x in (trace, w, b)]
        return torch.autograd.grad(nlm_glu_ref(*inputs), inputs, grad)


def sync_update_inputs(rng, n, dtype):
    """3 batch rows, n neurons and 5 pairs, one of them a self-pair."""
    left, right = rng.integers(0, n, 5), rng.integers(0, n, 5)
    right[0] = left[0]
    alpha = normal()(rng, (3, 5), dtype)
    return [normal()(rng, (3, n), dtype), left, right, rng.uniform(0.0, 1.0, 5).astype(dtype), alpha,
            positive(rng, (3, 5), dtype)]


def sync_update_ref(z, left, right, decay, alpha, beta):
    alpha_new = decay * alpha + z[:, left] * z[:, right]
    beta_new = decay * beta + 1
    return alpha_new, beta_new, alpha_new / beta_new.sqrt()


def sync_update_backward_ours(z, left, right, decay, alpha, beta, *grads):
    return tuple(bind(fu.sync_update_backward_p, z, left, right, decay, alpha, beta, *grads))


def sync_update_backward_ref(z, left, right, decay, alpha, beta, *grads):
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (z, decay, alpha, beta)]
        outs = sync_update_ref(inputs[0], left, right, *inputs[1:])
        return torch.autograd.grad(outs, inputs, grads)


def trace_push_ref(trace, new):
    return torch.cat([trace[..., 1:], new[..., None]], -1)


def trace_push_backward_ours(grad, other):
    """Apply the window's backward to a gradient that arrives as the sum of two."""
    return tuple(bind(fu.trace_push_backward_p, grad, other))


def trace_push_backward_ref(grad, other):
    with torch.enable_grad():
        inputs = [torch.zeros(grad.shape, dtype=grad.dtype, requires_grad=True),
                  torch.zeros(grad.shape[:-1], dtype=grad.dtype, requires_grad=True)]
        return torch.autograd.grad(trace_push_ref(*inputs), inputs, grad + other)


def layer_norm_ref(x, gamma, beta):
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, eps=1e-5)


def layer_norm_inputs(rng, n, dtype):
    return [normal(2.0)(rng, (2, 3, n), dtype), normal()(rng, (n,), dtype), normal()(rng, (n,), dtype)]


def layer_norm_backward_ours(x, gamma, grad):
    return tuple(bind(norm.layer_norm_backward_p, x, gamma, grad, eps=1e-5))


def layer_norm_silu_ref(x, gamma, beta):
    return F.silu(layer_norm_ref(x, gamma, beta))


def layer_norm_silu_backward_ours(x, gamma, beta, grad):
    return tuple(bind(norm.layer_norm_backward_p, x, gamma, grad, beta, eps=1e-5, activation="silu"))


def layer_norm_silu_backward_ref(x, gamma, beta, grad):
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_(), gamma.detach().requires_grad_(), beta.detach().requires_grad_()]
        return torch.autograd.grad(layer_norm_silu_ref(*inputs), inputs, grad)


def layer_norm_backward_ref(x, gamma, grad):
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_(), gamma.detach().requires_grad_(),
                  torch.zeros_like(gamma, requires_grad=True)]
        return torch.autograd.grad(layer_norm_ref(*inputs), inputs, grad)


def silu_backward_ref(x, grad):
    """The gradient of SiLU, as a graph that autograd differentiates again when an input requires grad."""
    differentiate = x.requires_grad or grad.requires_grad
    with torch.enable_grad():
        leaf = x if x.requires_grad else x.detach().requires_grad_()
        out = torch.autograd.grad(F.silu(leaf), leaf, grad, create_graph=differentiate)[0]
    return out if differentiate else out.detach()


def single_query_attention_inputs(rng, n, dtype):
    """n tokens, 2 rows, 4 heads of size 3."""
    return [normal()(rng, (2, 4, 3), dtype), normal()(rng, (2, n, 4, 3), dtype), normal()(rng, (2, n, 4, 3), dtype)]


def single_query_attention_ref(q, k, v):
    out = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2))  # (B, H, 1, dh)
    return out[:, :, 0]


def single_query_attention_backward_ours(*inputs):
    return tuple(bind(at.single_query_attention_backward_p, *inputs))


def single_query_attention_backward_ref(q, k, v, grad):
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        return torch.autograd.grad(single_query_attention_ref(*leaves), leaves, grad)


def decode_attention_inputs(rng, n, dtype):
    """A cache of n - 1 tokens (empty at n = 1), 2 rows, 4 query heads over 2 key/value heads of size 3."""
    new = [normal()(rng, (2, 2, 3), dtype) for _ in range(2)]
    cache = [normal()(rng, (n - 1, 2, 2, 3), dtype) for _ in range(2)]
    return [normal()(rng, (2, 4, 3), dtype), *new, *cache]


def decode_attention_ref(q, k, v, past_k, past_v):
    keys = torch.cat([past_k.permute(1, 2, 0, 3), k[:, :, None]], 2)  # (B, H_kv, L + 1, dh)
    values = torch.cat([past_v.permute(1, 2, 0, 3), v[:, :, None]], 2)
    qg = q.reshape(2, 2, 2, 3)
    weights = torch.softmax(qg @ keys.transpose(-1, -2) / 3**0.5, -1)
    return (weights @ values).reshape(2, 4, 3)


def decode_attention_backward_ours(*inputs):
    return tuple(bind(at.decode_attention_backward_p, *inputs))


def decode_attention_backward_ref(*inputs):
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in inputs[:5]]
        return torch.autograd.grad(decode_attention_ref(*leaves), leaves, inputs[5])


def causal_attention_inputs(rng, n, dtype):
    """n tokens (positions 0..n-1), 2 rows, 4 query heads over 2 key/value heads of size 3."""
    return [normal()(rng, (2, n, 4, 3), dtype), normal()(rng, (2, n, 2, 3), dtype), normal()(rng, (2, n, 2, 3), dtype),
            np.arange(n, dtype=np.int64)]


def causal_attention_ref(q, k, v, positions):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def causal_attention_backward_ours(*inputs):
    return tuple(bind(at.causal_attention_backward_p, *inputs))


def causal_attention_backward_ref(q, k, v, positions, grad):
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        return torch.autograd.grad(causal_attention_ref(*leaves, positions), leaves, grad)


FUSED_CASES = [
    Case("single_query_attention", ops.single_query_attention, single_query_attention_ref,
         single_query_attention_inputs, "single_query_attention"),
    Case("single_query_attention_backward", single_query_attention_backward_ours, single_query_attention_backward_ref,
         lambda r, n, d: single_query_attention_inputs(r, n, d) + [normal()(r, (2, 4, 3), d)],
         "single_query_attention_backward", differentiable=False),
    Case("causal_attention", ops.causal_attention, causal_attention_ref, causal_attention_inputs, "causal_attention"),
    Case("causal_attention_backward", causal_attention_backward_ours, causal_attention_backward_ref,
         lambda r, n, d: causal_attention_inputs(r, n, d) + [normal()(r, (2, n, 4, 3), d)],
         "causal_attention_backward", differentiable=False),
    Case("decode_attention", ops.decode_attention, decode_attention_ref, decode_attention_inputs, "decode_attention"),
    Case("decode_attention_backward", decode_attention_backward_ours, decode_attention_backward_ref,
         lambda r, n, d: decode_attention_inputs(r, n, d) + [normal()(r, (2, 4, 3), d)], "decode_attention_backward",
         differentiable=False),
    Case("layer_norm", ops.layer_norm, layer_norm_ref, layer_norm_inputs, "layer_norm"),
    Case("layer_norm_silu", lambda x, g, b: ops.layer_norm(x, g, b, activation="silu"), layer_norm_silu_ref,
         layer_norm_inputs, "layer_norm"),
    Case("layer_norm_silu_backward", layer_norm_silu_backward_ours, layer_norm_silu_backward_ref,
         lambda r, n, d: layer_norm_inputs(r, n, d) + [normal()(r, (2, 3, n), d)], "layer_norm_backward",
         differentiable=False),
    Case("layer_norm_backward", layer_norm_backward_ours, layer_norm_backward_ref,
         lambda r, n, d: layer_norm_inputs(r, n, d)[:2] + [normal()(r, (2, 3, n), d)], "layer_norm_backward",
         differentiable=False),
    Case("silu", ops.silu, F.silu, lambda r, n, d: [normal(3.0)(r, (3, n), d)], "silu"),
    # Its VJP is checked against torch's double backward of SiLU.
    Case("silu_backward", lambda x, g: bind(ew.silu_backward_p, x, g), silu_backward_ref,
         lambda r, n, d: [normal(3.0)(r, (3, n), d), normal()(r, (3, n), d)], "silu_backward"),
    Case("nlm_glu", ops.nlm_glu, nlm_glu_ref, nlm_glu_inputs, "nlm_glu"),
    # The backward primitives have no VJP of their own, so their gradients are not checked.
    Case("nlm_glu_backward", nlm_glu_backward_ours, nlm_glu_backward_ref,
         lambda r, n, d: nlm_glu_inputs(r, n, d) + [normal()(r, (n, 3, 2), d)], "nlm_glu_backward",
         differentiable=False),
    Case("sync_update", ops.sync_update, sync_update_ref, sync_update_inputs, "sync_update"),
    Case("sync_update_backward", sync_update_backward_ours, sync_update_backward_ref,
         lambda r, n, d: sync_update_inputs(r, n, d) + [normal()(r, (3, 5), d) for _ in range(3)],
         "sync_update_backward", differentiable=False),
    Case("matvec", ops.matvec, torch.matmul,
         lambda r, n, d: [normal()(r, (2, 1, n), d), normal()(r, (n, 5), d)], "matvec"),
    Case("trace_push", ops.trace_push, trace_push_ref,
         lambda r, n, d: [normal()(r, (n, 3, 4), d), normal()(r, (n, 3), d)], "trace_push"),
    Case("trace_push_backward", trace_push_backward_ours, trace_push_backward_ref,
         lambda r, n, d: [normal()(r, (n, 3, 4), d) for _ in range(2)], "trace_push_backward",
         differentiable=False),
]
PRIMITIVE_CASES += FUSED_CASES

ALL_CASES = PRIMITIVE_CASES + COMPOSITE_CASES


def case_id(case: Case) -> str:
    return case.name


# --------------------------------------------------------------------------------------------
# Helpers


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def to_torch(arrays, requires_grad=()):
    return [torch.from_numpy(np.array(a)).requires_grad_(i in requires_grad) for i, a in enumerate(arrays)]


def upcast(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """float32 arrays as float64, for a reference that adds no rounding error of its own."""
    return [a.astype(np.float64) if a.dtype == np.float32 else a for a in arrays]


def tolerances(case: Case, dtype, expected: np.ndarray) -> dict:
    """rtol/atol for comparing with ``expected``; float32 atol scales with the largest magnitude."""
    dtype = np.dtype(dtype)
    if dtype != np.float32:
        return {"rtol": RTOL[dtype], "atol": ATOL[dtype]}
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    return {"rtol": RTOL[dtype], "atol": case.f32_atol * scale}


def recorded_primitives(fn, arrays) -> set[str]:
    """Names of the primitives ``fn`` records when traced on values that stand for ``arrays``.

    Integer arrays stay numpy constants, as indices do under ``mg.value_and_grad``.
    """
    trace = Trace(name="test")
    with trace_scope(trace):
        args = [a if np.issubdtype(a.dtype, np.integer) else trace.placeholder(a.shape, a.dtype, concrete=a)
                for a in arrays]
        fn(*args)
    return {node.prim.name for node in trace.nodes}


# --------------------------------------------------------------------------------------------
# Coverage of the primitive set


def test_every_primitive_has_a_case():
    covered = {case.prim for case in PRIMITIVE_CASES}
    missing = sorted(set(PRIMITIVES) - covered)
    assert not missing, f"primitives without a test case: {missing}"


def test_case_names_are_unique():
    names = [case.name for case in ALL_CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", PRIMITIVE_CASES, ids=case_id)
def test_case_records_its_primitive(case, rng):
    arrays = case.inputs(rng, 3, np.dtype(np.float64))
    assert case.prim in recorded_primitives(case.ours, arrays)


# --------------------------------------------------------------------------------------------
# Forward and VJP against torch


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_forward_matches_torch(case, n, dtype, rng):
    arrays = case.inputs(rng, n, np.dtype(dtype))
    ours = as_tuple(case.ours(*arrays))
    with torch.no_grad():
        same_dtype = as_tuple(case.ref(*to_torch(arrays)))
        exact = as_tuple(case.ref(*to_torch(upcast(arrays))))

    assert len(ours) == len(same_dtype)
    for o, s, e in zip(ours, same_dtype, exact):
        assert isinstance(o, np.ndarray)
        assert o.shape == tuple(s.shape)
        assert o.dtype == s.numpy().dtype
        np.testing.assert_allclose(o, e.numpy(), **tolerances(case, dtype, e.numpy()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.differentiable], ids=case_id)
def test_vjp_matches_torch_autograd(case, n, dtype, rng):
    dtype = np.dtype(dtype)
    arrays = case.inputs(rng, n, dtype)
    wrt = tuple(i for i, a in enumerate(arrays) if a.dtype == dtype)
    assert wrt, "a differentiable case needs an input of the test dtype"
    shapes = [o.shape for o in as_tuple(case.ours(*arrays))]
    cotangents = [rng.standard_normal(s).astype(dtype) for s in shapes]

    def loss(*xs):
        total = None
        for out, g in zip(as_tuple(case.ours(*xs)), cotangents):
            term = ops.sum(ops.mul(ops.cast(out, dtype), g))  # casts integer and bool outputs to dtype
            total = term if total is None else ops.add(total, term)
        return total

    value, grads = mg.value_and_grad(loss, argnums=wrt)(*arrays)

    tensors = to_torch(upcast(arrays), requires_grad=wrt)
    terms = [(out.to(torch.float64) * torch.from_numpy(g.astype(np.float64))).sum()
             for out, g in zip(as_tuple(case.ref(*tensors)), cotangents)]
    ref_loss = torch.stack(terms).sum()
    inputs = [tensors[i] for i in wrt]
    if ref_loss.requires_grad:
        ref_grads = torch.autograd.grad(ref_loss, inputs, allow_unused=True)
    else:
        ref_grads = [None] * len(inputs)

    assert isinstance(value, np.ndarray)
    assert len(grads) == len(wrt)
    for i, g, r in zip(wrt, grads, ref_grads):
        r = np.zeros(arrays[i].shape) if r is None else r.numpy()
        assert g.shape == arrays[i].shape, f"gradient of input {i}"
        assert g.dtype == dtype, f"gradient of input {i}"
        np.testing.assert_allclose(g, r, err_msg=f"gradient of input {i}", **tolerances(case, dtype, r))


# --------------------------------------------------------------------------------------------
# Python operators on traced values


def test_value_operators_match_numpy(rng):
    x = rng.standard_normal((3, 4))
    y = rng.standard_normal((4,))
    w = rng.standard_normal((4, 2))
    expected = [
        x + y, y + 1.0, 1.0 + x, x - y, 2.0 - x, x * y, 3.0 * x, x / 2.0, 1.0 / (x * x + 1.0),
        -x, (x * x + 1.0) ** 0.5, x @ w, w.T @ x.T, x.T, x[1:, ::2], x[-1], x[..., 2],
        x > y, x >= 0.5, x < y, x <= 0.0, x.reshape(2, 6), x.sum(axis=0), x.mean(), x.astype(np.float32),
    ]

    def f(x, y, w):
        return [
            x + y, y + 1.0, 1.0 + x, x - y, 2.0 - x, x * y, 3.0 * x, x / 2.0, 1.0 / (x * x + 1.0),
            -x, (x * x + 1.0) ** 0.5, x @ w, w.T @ x.T, x.T, x[1:, ::2], x[-1], x[..., 2],
            x > y, x >= 0.5, x < y, x <= 0.0, x.reshape(2, 6), x.sum(axis=0), x.mean(), x.astype(np.float32),
        ]

    trace = Trace(name="test")
    with trace_scope(trace):
        outs = f(*[trace.placeholder(a.shape, a.dtype, concrete=a) for a in (x, y, w)])
    assert all(isinstance(o, Value) for o in outs)
    for k, (o, e) in enumerate(zip(outs, expected)):
        assert o.shape == e.shape, f"expression {k}"
        assert o.dtype == e.dtype, f"expression {k}"
        np.testing.assert_allclose(o.concrete, e, rtol=1e-12, atol=1e-12, err_msg=f"expression {k}")


def test_getitem_out_of_range_raises(rng):
    x = rng.standard_normal(3)
    with pytest.raises(IndexError):
        ops.getitem(x, 3)

    def f(v):
        v[-4]
        return ops.sum(v)

    with pytest.raises(IndexError):
        mg.value_and_grad(f)(x)


def test_traced_value_rejects_iteration(rng):
    def iterate(v):
        return ops.sum(ops.stack(list(v)))

    def to_numpy(v):
        return ops.sum(np.max(v))

    with pytest.raises(TypeError):
        mg.value_and_grad(iterate)(rng.standard_normal(3))
    with pytest.raises(TypeError):
        mg.value_and_grad(to_numpy)(rng.standard_normal(3))


def test_take_vjp_with_empty_axis():
    x = np.ones((0, 3))
    idx = np.array([0, 2])
    assert ops.gather(x, idx, axis=1).shape == (0, 2)
    dx = mg.grad(lambda v: ops.sum(ops.gather(v, idx, axis=1)))(x)
    assert dx.shape == (0, 3)


def test_python_scalars_adopt_tensor_dtype(rng):
    x = rng.standard_normal(5).astype(np.float32)
    assert ops.add(x, 1.5).dtype == np.float32
    assert ops.mul(2, x).dtype == np.float32
    assert ops.where(x > 0, x, 0.0).dtype == np.float32


def test_value_has_no_truth_value(rng):
    from modgrad.engine.core import TraceError

    def f(x):
        if ops.sum(x) > 0:
            return ops.sum(x)
        return ops.sum(-x)

    with pytest.raises(TraceError, match="ops.where"):
        mg.value_and_grad(f)(rng.standard_normal(3))


def test_grad_of_unused_argument_is_zero(rng):
    params = {"used": rng.standard_normal(3), "unused": rng.standard_normal((2, 2))}
    value, grads = mg.value_and_grad(lambda p: ops.sum(ops.square(p["used"])))(params)
    np.testing.assert_allclose(grads["used"], 2.0 * params["used"], rtol=1e-12)
    np.testing.assert_array_equal(grads["unused"], np.zeros((2, 2)))


def test_grad_of_argument_used_twice(rng):
    x = rng.standard_normal(4)
    g = mg.grad(lambda a, b: ops.sum(ops.mul(a, b)), argnums=(0, 1))(x, x)
    np.testing.assert_allclose(g[0], x, rtol=1e-12)
    np.testing.assert_allclose(g[1], x, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Shape rules against numpy (hypothesis)

# derandomize: every run draws the same examples, so a failure reproduces and no database is kept.
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def traced_shape(fn, *arrays) -> tuple:
    """The shape the op's shape rule gives, without running the numpy implementation."""
    trace = Trace(name="shape rule")
    with trace_scope(trace):
        out = fn(*[trace.placeholder(a.shape, a.dtype) if isinstance(a, np.ndarray) else a for a in arrays])
    return out.shape


def arange_of(shape) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)


@PROPERTY_SETTINGS
@given(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=5))
def test_broadcasting_matches_numpy(shapes):
    (xs, ys), result = shapes
    x = arange_of(xs) + 1.0
    y = arange_of(ys) * 0.5
    out = ops.add(x, y)
    np.testing.assert_array_equal(out, x + y)
    assert traced_shape(ops.add, x, y) == result

    # The adjoint of broadcasting sums the cotangent back to each input's shape.
    g = np.cos(arange_of(result))
    gx, gy = mg.grad(lambda a, b: ops.sum(ops.mul(ops.add(a, b), g)), argnums=(0, 1))(x, y)
    expected_gx = np.sum(g, axis=tuple(range(len(result) - len(xs))))
    expected_gx = np.sum(expected_gx, axis=tuple(i for i, d in enumerate(xs) if d == 1), keepdims=True)
    expected_gy = np.sum(g, axis=tuple(range(len(result) - len(ys))))
    expected_gy = np.sum(expected_gy, axis=tuple(i for i, d in enumerate(ys) if d == 1), keepdims=True)
    np.testing.assert_allclose(gx, expected_gx.reshape(xs), rtol=1e-12)
    np.testing.assert_allclose(gy, expected_gy.reshape(ys), rtol=1e-12)


@PROPERTY_SETTINGS
@given(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
def test_broadcast_failure_matches_numpy(xs, ys):
    x, y = np.ones(xs), np.ones(ys)
    try:
        np.broadcast_shapes(xs, ys)
    except ValueError:
        with pytest.raises(ShapeError, match="add"):
            ops.add(x, y)
    else:
        assert ops.add(x, y).shape == np.broadcast_shapes(xs, ys)


@st.composite
def shape_and_regrouping(draw):
    """A shape and another shape with the same element count (factors regrouped in a new order)."""
    factors = draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=0, max_size=6))
    src = draw(st.permutations(factors))
    dst = draw(st.permutations(factors))
    cut_src = sorted(draw(st.lists(st.integers(0, len(factors)), max_size=3)))
    cut_dst = sorted(draw(st.lists(st.integers(0, len(factors)), max_size=3)))

    def group(fs, cuts):
        bounds = [0, *cuts, len(fs)]
        return tuple(int(np.prod(fs[a:b])) for a, b in zip(bounds, bounds[1:]))

    return group(src, cut_src), group(dst, cut_dst)


@PROPERTY_SETTINGS
@given(shape_and_regrouping(), st.booleans())
def test_reshape_matches_numpy(shapes, use_minus_one):
    src, dst = shapes
    x = arange_of(src)
    target = dst
    if use_minus_one and dst:
        target = (-1,) + dst[1:]
    np.testing.assert_array_equal(ops.reshape(x, target), np.reshape(x, target))
    assert traced_shape(lambda v: ops.reshape(v, dst), x) == dst


@PROPERTY_SETTINGS
@given(st.data())
def test_transpose_matches_numpy(data):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=5, max_side=4))
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    x = arange_of(shape)
    np.testing.assert_array_equal(ops.transpose(x, perm), np.transpose(x, perm))
    assert traced_shape(lambda v: ops.transpose(v, perm), x) == np.transpose(x, perm).shape
    g = np.sin(arange_of(np.transpose(x, perm).shape))
    dx = mg.grad(lambda v: ops.sum(ops.mul(ops.transpose(v, perm), g)))(x)
    np.testing.assert_array_equal(dx, np.transpose(g, np.argsort(perm)))


@PROPERTY_SETTINGS
@given(st.data())
def test_concat_matches_numpy(data):
    base = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))
    axis = data.draw(st.integers(-len(base), len(base) - 1))
    sizes = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=4))
    parts = []
    for k, size in enumerate(sizes):
        shape = list(base)
        shape[axis] = size
        parts.append(arange_of(shape) + 100 * k)
    expected = np.concatenate(parts, axis=axis)
    np.testing.assert_array_equal(ops.concat(parts, axis=axis), expected)
    assert traced_shape(lambda *vs: ops.concat(list(vs), axis=axis), *parts) == expected.shape


@PROPERTY_SETTINGS
@given(st.data())
def test_getitem_matches_numpy(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=6))
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=False, allow_ellipsis=True))
    x = arange_of(shape)
    expected = x[index]
    np.testing.assert_array_equal(ops.getitem(x, index), expected)
    assert traced_shape(lambda v: ops.getitem(v, index), x) == expected.shape

    # The adjoint of indexing scatters the cotangent into zeros.
    g = np.cos(arange_of(expected.shape))
    expected_dx = np.zeros(shape)
    expected_dx[index] = g
    dx = mg.grad(lambda v: ops.sum(ops.mul(ops.getitem(v, index), g)))(x)
    np.testing.assert_array_equal(dx, expected_dx)


@PROPERTY_SETTINGS
@given(st.data())
def test_take_matches_numpy(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    axis = data.draw(st.integers(0, len(shape) - 1))
    d = shape[axis]
    idx = data.draw(hnp.arrays(np.int64, hnp.array_shapes(min_dims=0, max_dims=2, max_side=4),
                               elements=st.integers(-d, d - 1)))
    x = arange_of(shape)
    expected = np.take(x, idx, axis=axis)
    np.testing.assert_array_equal(ops.gather(x, idx, axis=axis), expected)
    assert traced_shape(lambda v: ops.gather(v, idx, axis=axis), x) == expected.shape

    g = np.cos(arange_of(expected.shape))
    expected_dx = np.zeros(shape)
    np.add.at(np.moveaxis(expected_dx, axis, 0), idx.reshape(-1) % d,
              np.moveaxis(g.reshape(shape[:axis] + (-1,) + shape[axis + 1:]), axis, 0))
    dx = mg.grad(lambda v: ops.sum(ops.mul(ops.gather(v, idx, axis=axis), g)))(x)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12)
