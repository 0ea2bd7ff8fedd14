"""Elementwise primitives: unary maps, broadcasting binary arithmetic, comparisons, where, cast."""

from __future__ import annotations

import numpy as np

from modgrad.engine.core import Primitive, ShapeError, Value, bind, broadcast_shapes, register


def _unary_rule(x, **_):
    return [x]


def _float_unary_rule(x, **_):
    shape, dtype = x
    if not np.issubdtype(dtype, np.floating):
        raise ShapeError(f"expected a floating dtype, got {dtype}")
    return [x]


def _unary(name: str, fn, vjp, float_only: bool = True) -> Primitive:
    return register(
        Primitive(
            name,
            _float_unary_rule if float_only else _unary_rule,
            lambda x: [np.asarray(fn(x)).astype(x.dtype, copy=False)],
            vjp,
        )
    )


def _sigmoid(x):
    # The exponent -|x| is at most 0, so exp cannot overflow. Each sign then divides by 1 + e >= 1.
    e = np.exp(-np.abs(x))
    out = np.where(x >= 0, 1.0, e) / (1.0 + e)
    return out if out.dtype == x.dtype else out.astype(x.dtype)


def _o(node):
    return node.outputs[0]


def _x(node):
    return node.inputs[0]


neg_p = _unary("neg", np.negative, lambda n, g: [-g[0]], float_only=False)
exp_p = _unary("exp", np.exp, lambda n, g: [g[0] * _o(n)])
log_p = _unary("log", np.log, lambda n, g: [g[0] / _x(n)])
tanh_p = _unary("tanh", np.tanh, lambda n, g: [g[0] * (1.0 - _o(n) * _o(n))])
sigmoid_p = _unary("sigmoid", _sigmoid, lambda n, g: [g[0] * _o(n) * (1.0 - _o(n))])
sqrt_p = _unary("sqrt", np.sqrt, lambda n, g: [g[0] * 0.5 / _o(n)])
rsqrt_p = _unary("rsqrt", lambda x: 1.0 / np.sqrt(x), lambda n, g: [g[0] * -0.5 * _o(n) / _x(n)])
abs_p = _unary("abs", np.abs, lambda n, g: [g[0] * bind(sign_p, _x(n))], float_only=False)
sign_p = _unary("sign", np.sign, lambda n, g: [None], float_only=False)
sin_p = _unary("sin", np.sin, lambda n, g: [g[0] * bind(cos_p, _x(n))])
cos_p = _unary("cos", np.cos, lambda n, g: [-(g[0] * bind(sin_p, _x(n)))])
floor_p = _unary("floor", np.floor, lambda n, g: [None])


def _identity_vjp(node, g):
    return [g[0]]


# SiLU is one op each way: written as x * sigmoid(x), its gradient took five more ops and kept
# sigmoid(x) and 1 - sigmoid(x) as loop residuals.
def _silu_backward_impl(x, g):
    s = _sigmoid(x)
    return [(g * s * (1.0 + x * (1.0 - s))).astype(x.dtype, copy=False)]


def _silu_backward_rule(x, g):
    if tuple(x[0]) != tuple(g[0]) or x[1] != g[1]:
        raise ShapeError(f"the output gradient must be {x[0]} {x[1]}, got {g[0]} {g[1]}")
    return _float_unary_rule(x)


def _silu_backward_vjp(node, h):
    # d/dx [g s (1 + x (1 - s))] = g s (1 - s) (2 + x (1 - 2 s)), with s = sigmoid(x).
    x, g = node.inputs
    s = bind(sigmoid_p, x)
    one_minus = 1.0 - s
    d_g = h[0] * s * (1.0 + x * one_minus)
    d_x = h[0] * g * s * one_minus * (2.0 + x * (one_minus - s))
    return [d_x, d_g]


silu_p = _unary("silu", lambda x: x * _sigmoid(x), lambda n, g: [bind(silu_backward_p, _x(n), g[0])])
silu_backward_p = register(Primitive("silu_backward", _silu_backward_rule, _silu_backward_impl, _silu_backward_vjp))



identity_p = register(Primitive("identity", _unary_rule, lambda x: [x.copy()], _identity_vjp))
stop_gradient_p = register(Primitive("stop_gradient", _unary_rule, lambda x: [x], lambda n, g: [None]))


# --------------------------------------------------------------------------------------------
# Binary arithmetic with numpy broadcasting


def _binary_rule(x, y, **_):
    (xs, xd), (ys, yd) = x, y
    if xd != yd:
        raise ShapeError(f"dtypes differ: {xd} and {yd} (cast one side first)")
    return [(broadcast_shapes(xs, ys), xd)]


def unbroadcast(g: Value, shape) -> Value:
    """Sum ``g`` down to ``shape``: the adjoint of numpy broadcasting."""
    from modgrad.engine.prims.reduce import reduce_sum_p
    from modgrad.engine.prims.shape import reshape_p

    if tuple(g.shape) == tuple(shape):
        return g
    lead = len(g.shape) - len(shape)
    axes = list(range(lead))
    for i, d in enumerate(shape):
        if d == 1 and g.shape[lead + i] != 1:
            axes.append(lead + i)
    if axes:
        g = bind(reduce_sum_p, g, axes=tuple(axes), keepdims=False)
    if tuple(g.shape) != tuple(shape):
        g = bind(reshape_p, g, shape=tuple(shape))
    return g


def _shape_of(x):
    return x.shape


def _binary(name, fn, vjp) -> Primitive:
    def impl(x, y):
        out = fn(x, y)
        if not isinstance(out, np.ndarray):  # 0-d operands give numpy scalars
            out = np.asarray(out)
        # Integer division yields floats in numpy; the engine keeps the operands' dtype.
        return [out if out.dtype == x.dtype else out.astype(x.dtype)]

    return register(Primitive(name, _binary_rule, impl, vjp))


def _ub(g, x):
    return None if g is None else unbroadcast(g, _shape_of(x))


add_p = _binary("add", np.add, lambda n, g: [_ub(g[0], n.inputs[0]), _ub(g[0], n.inputs[1])])
sub_p = _binary("sub", np.subtract, lambda n, g: [_ub(g[0], n.inputs[0]), _ub(-g[0], n.inputs[1])])
mul_p = _binary(
    "mul",
    np.multiply,
    lambda n, g: [_ub(g[0] * n.inputs[1], n.inputs[0]), _ub(g[0] * n.inputs[0], n.inputs[1])],
)
div_p = _binary(
    "div",
    np.divide,
    lambda n, g: [_ub(g[0] / n.inputs[1], n.inputs[0]), _ub(-(g[0] * _o(n)) / n.inputs[1], n.inputs[1])],
)


def _pow_vjp(node, g):
    x, y = node.inputs
    out = _o(node)
    gx = g[0] * y * bind(pow_p, x, y - np.ones((), x.dtype))
    # d/dy x^y = x^y log x, defined for x > 0; zero elsewhere keeps integer powers of negatives usable.
    safe = bind(where_p, bind(greater_p, x, np.zeros((), x.dtype)), x, np.ones((), x.dtype))
    gy = g[0] * out * bind(log_p, safe)
    return [_ub(gx, x), _ub(gy, y)]


pow_p = _binary("pow", np.power, _pow_vjp)


def _minmax_vjp(pick_x_when):
    def vjp(node, g):
        x, y = node.inputs
        mask = bind(pick_x_when, x, y)
        zero = np.zeros((), g[0].dtype)
        return [_ub(bind(where_p, mask, g[0], zero), x), _ub(bind(where_p, mask, zero, g[0]), y)]

    return vjp


# Ties send the whole gradient to x. torch splits it evenly, so tests avoid exact ties.
maximum_p = _binary("maximum", np.maximum, lambda n, g: _minmax_vjp(greater_equal_p)(n, g))
minimum_p = _binary("minimum", np.minimum, lambda n, g: _minmax_vjp(less_equal_p)(n, g))


# --------------------------------------------------------------------------------------------
# Comparisons, logic, where


def _compare_rule(x, y, **_):
    (xs, xd), (ys, yd) = x, y
    if xd != yd:
        raise ShapeError(f"dtypes differ: {xd} and {yd}")
    return [(broadcast_shapes(xs, ys), np.dtype(bool))]


def _compare(name, fn) -> Primitive:
    return register(Primitive(name, _compare_rule, lambda x, y: [np.asarray(fn(x, y))], lambda n, g: [None, None]))


greater_p = _compare("greater", np.greater)
greater_equal_p = _compare("greater_equal", np.greater_equal)
less_equal_p = _compare("less_equal", np.less_equal)
equal_p = _compare("equal", np.equal)
not_equal_p = _compare("not_equal", np.not_equal)
logical_and_p = _compare("logical_and", np.logical_and)
logical_or_p = _compare("logical_or", np.logical_or)
logical_not_p = _unary("logical_not", np.logical_not, lambda n, g: [None], float_only=False)


def _where_rule(c, x, y, **_):
    (cs, cd), (xs, xd), (ys, yd) = c, x, y
    if cd != np.dtype(bool):
        raise ShapeError(f"condition must be bool, got {cd}")
    if xd != yd:
        raise ShapeError(f"branch dtypes differ: {xd} and {yd}")
    return [(broadcast_shapes(cs, xs, ys), xd)]


def _where_vjp(node, g):
    c, x, y = node.inputs
    zero = np.zeros((), g[0].dtype)
    return [None, _ub(bind(where_p, c, g[0], zero), x), _ub(bind(where_p, c, zero, g[0]), y)]


where_p = register(Primitive("where", _where_rule, lambda c, x, y: [np.where(c, x, y)], _where_vjp))


# --------------------------------------------------------------------------------------------
# Cast


def _cast_rule(x, dtype):
    return [(x[0], np.dtype(dtype))]


def _cast_vjp(node, g):
    src = node.inputs[0]
    src_dtype = src.dtype if isinstance(src, Value) else np.asarray(src).dtype
    if not (np.issubdtype(src_dtype, np.floating) and np.issubdtype(g[0].dtype, np.floating)):
        return [None]
    return [bind(cast_p, g[0], dtype=src_dtype)]


cast_p = register(Primitive("cast", _cast_rule, lambda x, dtype: [x.astype(dtype)], _cast_vjp))
