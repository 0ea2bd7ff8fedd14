"""Elementwise lowerings: unary maps, broadcasting arithmetic, comparisons, where, cast."""

from __future__ import annotations

from max.dtype import DType
from max.graph import ops

from modgrad.graphs import lowering, to_max_dtype

_UNARY = {
    "neg": ops.negate,
    "exp": ops.exp,
    "log": ops.log,
    "tanh": ops.tanh,
    "sigmoid": ops.sigmoid,
    "sqrt": ops.sqrt,
    "rsqrt": ops.rsqrt,
    "abs": ops.abs,
    "sin": ops.sin,
    "cos": ops.cos,
    "floor": ops.floor,
    "logical_not": ops.logical_not,
}

_BINARY = {
    "add": ops.add,
    "sub": ops.sub,
    "mul": ops.mul,
    "div": ops.div,
    "pow": ops.pow,
    "maximum": lambda x, y: ops.max(x, y),
    "minimum": lambda x, y: ops.min(x, y),
    "greater": ops.greater,
    "greater_equal": ops.greater_equal,
    "less_equal": lambda x, y: ops.greater_equal(y, x),
    "equal": ops.equal,
    "not_equal": ops.not_equal,
    "logical_and": ops.logical_and,
    "logical_or": ops.logical_or,
}


def _register_unary(name, fn):
    lowering(name)(lambda x, device: fn(x))


def _register_binary(name, fn):
    lowering(name)(lambda x, y, device: fn(x, y))


for _name, _fn in _UNARY.items():
    _register_unary(_name, _fn)
for _name, _fn in _BINARY.items():
    _register_binary(_name, _fn)


@lowering("sign")
def _sign(x, device):
    zero = ops.constant(0, x.dtype, device)
    return ops.cast(ops.greater(x, zero), x.dtype) - ops.cast(ops.greater(zero, x), x.dtype)


@lowering("silu")
def _silu(x, device):
    return x * ops.sigmoid(x)


@lowering("silu_backward")
def _silu_backward(x, grad, device):
    s = ops.sigmoid(x)
    return grad * s * (1.0 + x * (1.0 - s))


@lowering("identity")
def _identity(x, device):
    return x


@lowering("stop_gradient")
def _stop_gradient(x, device):
    return x


@lowering("where")
def _where(c, x, y, device):
    return ops.where(c, x, y)


@lowering("cast")
def _cast(x, device, dtype):
    return ops.cast(x, to_max_dtype(dtype))
