"""Values, primitives and traces: the recording half of the engine.

A primitive is one tensor operation defined once: a shape rule, a numpy implementation and a
vector-Jacobian product written in the same primitives. Its MAX lowering lives in
``modgrad.graphs``. Calling a primitive on plain numpy arrays runs it eagerly; calling it on a
``Value`` records a ``Node`` in the active ``Trace``. Values recorded with concrete inputs also
carry their numpy result, so an eager trace is a tape that backprop can walk.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

Dim = int | str  # a str is a symbolic size, e.g. "B", bound when the program runs
Shape = tuple[Dim, ...]

_ENGINE_DIR = os.path.dirname(os.path.abspath(__file__))
_OPS_FILE = os.path.join(os.path.dirname(_ENGINE_DIR), "ops.py")


class ShapeError(ValueError):
    """An op received shapes or dtypes it cannot combine."""


class TraceError(RuntimeError):
    """A traced value was used outside the trace that owns it."""


def _user_location() -> str:
    """Return 'file:line: source' of the innermost caller outside the engine."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_ENGINE_DIR) and path != _OPS_FILE:
            import linecache

            source = linecache.getline(path, frame.f_lineno).strip()
            return f"{path}:{frame.f_lineno}: {source}"
        frame = frame.f_back
    return "<unknown location>"


# --------------------------------------------------------------------------------------------
# Primitives


@dataclass(frozen=True)
class Primitive:
    """One op of the closed engine op set.

    ``shape_rule(*avals, **attrs) -> list[(shape, dtype)]`` where each aval is ``(shape, dtype)``;
    ``impl(*arrays, **attrs) -> list[np.ndarray]``; ``vjp(node, cotangents) -> list[Value | None]``
    (one entry per input, ``None`` where no gradient flows).
    """

    name: str
    shape_rule: Callable[..., list[tuple[Shape, np.dtype]]]
    impl: Callable[..., list[np.ndarray]]
    vjp: Callable[["Node", list["Value"]], list["Value | None"]] | None = None
    multiple_results: bool = False

    def __repr__(self) -> str:
        return f"Primitive({self.name})"


PRIMITIVES: dict[str, Primitive] = {}


def register(prim: Primitive) -> Primitive:
    if prim.name in PRIMITIVES:
        raise ValueError(f"primitive {prim.name!r} is already registered")
    PRIMITIVES[prim.name] = prim
    return prim


# --------------------------------------------------------------------------------------------
# Values, nodes, traces

_ids = itertools.count()


class Value:
    """A tensor recorded in a trace: shape, dtype, producer, and the numpy result when known."""

    __array_priority__ = 1000  # numpy defers mixed arithmetic to Value's operators

    __slots__ = ("shape", "dtype", "node", "trace", "concrete", "uid")

    def __init__(self, shape: Shape, dtype, trace: "Trace", node: "Node | None" = None, concrete=None):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.trace = trace
        self.node = node
        self.concrete = concrete
        self.uid = next(_ids)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"Value(({dims}), {self.dtype})"

    def __len__(self) -> int:
        if not self.shape or not isinstance(self.shape[0], int):
            raise TypeError(f"len() of a value with shape {self.shape}")
        return self.shape[0]

    # Arithmetic routes through the public ops so broadcasting and scalars behave like numpy.
    def __add__(self, o): return _ops().add(self, o)
    def __radd__(self, o): return _ops().add(o, self)
    def __sub__(self, o): return _ops().sub(self, o)
    def __rsub__(self, o): return _ops().sub(o, self)
    def __mul__(self, o): return _ops().mul(self, o)
    def __rmul__(self, o): return _ops().mul(o, self)
    def __truediv__(self, o): return _ops().div(self, o)
    def __rtruediv__(self, o): return _ops().div(o, self)
    def __pow__(self, o): return _ops().pow(self, o)
    def __neg__(self): return _ops().neg(self)
    def __matmul__(self, o): return _ops().matmul(self, o)
    def __rmatmul__(self, o): return _ops().matmul(o, self)
    def __gt__(self, o): return _ops().greater(self, o)
    def __ge__(self, o): return _ops().greater_equal(self, o)
    def __lt__(self, o): return _ops().greater(o, self)
    def __le__(self, o): return _ops().greater_equal(o, self)
    def __getitem__(self, idx): return _ops().getitem(self, idx)

    @property
    def T(self):
        return _ops().transpose(self, tuple(reversed(range(self.ndim))))

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _ops().reshape(self, shape)

    def astype(self, dtype):
        return _ops().cast(self, dtype)

    def sum(self, axis=None, keepdims=False):
        return _ops().sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops().mean(self, axis=axis, keepdims=keepdims)

    def __iter__(self):
        raise TypeError(f"cannot iterate over a traced value {self}; index it or use ops")

    def __array__(self, *args, **kwargs):
        raise TypeError(f"a traced value {self} cannot become a numpy array; use modgrad.ops on it")

    def __bool__(self):
        raise TraceError(
            "a traced value has no Python truth value; use ops.where or ops.cond for data-dependent choices"
        )


def _ops():
    from modgrad import ops

    return ops


@dataclass(eq=False)
class Node:
    prim: Primitive
    inputs: list  # Value | np.ndarray (constants)
    attrs: dict
    outputs: list[Value] = field(default_factory=list)
    location: str = ""


@dataclass(eq=False)
class Program:
    """A closed straight-line program: placeholders in, nodes, values out."""

    inputs: list[Value]
    nodes: list[Node]
    outputs: list  # Value | np.ndarray (an output may be a constant or an input)

    def fingerprint(self) -> str:
        from modgrad.engine.serialize import program_fingerprint

        return program_fingerprint(self)


class Trace:
    """An append-only list of nodes with its placeholders and the outer values it captured."""

    def __init__(self, parent: "Trace | None" = None, name: str = "trace", device: str | None = None):
        self.parent = parent
        self.name = name
        # The device the traced program will run on, when known (a nested trace inherits it).
        # Loop gradients take a form that suits it.
        self.device = device if device is not None or parent is None else parent.device
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.captures: dict[int, tuple[Value, Value]] = {}  # outer uid -> (outer, placeholder)

    def placeholder(self, shape: Shape, dtype, concrete=None) -> Value:
        v = Value(shape, dtype, self, None, concrete)
        self.inputs.append(v)
        return v

    def owns(self, v: Value) -> bool:
        return v.trace is self

    def capture(self, v: Value) -> Value:
        """Return this trace's stand-in for a value that belongs to an enclosing trace."""
        if v.uid in self.captures:
            return self.captures[v.uid][1]
        if self.parent is not None and not self.parent.owns(v):
            v = self.parent.capture(v)
        if self.parent is None or not self.parent.owns(v):
            raise TraceError(f"{v} belongs to a trace that is no longer active")
        ph = Value(v.shape, v.dtype, self, None, None)
        self.captures[v.uid] = (v, ph)
        return ph


_TRACE_STACK: list[Trace] = []


def current_trace() -> Trace | None:
    return _TRACE_STACK[-1] if _TRACE_STACK else None


class trace_scope:
    """Context manager that makes ``trace`` the active trace."""

    def __init__(self, trace: Trace):
        self.trace = trace

    def __enter__(self) -> Trace:
        _TRACE_STACK.append(self.trace)
        return self.trace

    def __exit__(self, *exc) -> None:
        popped = _TRACE_STACK.pop()
        assert popped is self.trace


# --------------------------------------------------------------------------------------------
# Binding a primitive


def _aval(x) -> tuple[Shape, np.dtype]:
    if isinstance(x, Value):
        return x.shape, x.dtype
    return tuple(x.shape), x.dtype


def bind(prim: Primitive, *inputs, **attrs):
    """Apply ``prim``: eagerly on numpy inputs, or recorded when any input is a Value."""
    has_value = any(isinstance(x, Value) for x in inputs)
    if not has_value and not (_has_symbolic(attrs) and current_trace() is not None):
        arrays = [np.asarray(x) for x in inputs]
        try:
            prim.shape_rule(*[_aval(a) for a in arrays], **attrs)
        except ShapeError as e:
            raise ShapeError(_shape_message(prim, arrays, e)) from None
        outs = prim.impl(*arrays, **attrs)
        return outs if prim.multiple_results else outs[0]

    trace = current_trace()
    if trace is None:
        raise TraceError(
            f"{prim.name} received a traced value outside any active trace; values from "
            "value_and_grad/compile cannot be used after the call returns"
        )
    args = []
    for x in inputs:
        if isinstance(x, Value):
            args.append(x if trace.owns(x) else trace.capture(x))
        else:
            args.append(np.asarray(x))

    try:
        out_avals = prim.shape_rule(*[_aval(a) for a in args], **attrs)
    except ShapeError as e:
        raise ShapeError(_shape_message(prim, args, e)) from None

    node = Node(prim, args, attrs, location="")
    concretes = None
    if not _has_symbolic(attrs) and all((not isinstance(a, Value)) or a.concrete is not None for a in args):
        arrays = [a.concrete if isinstance(a, Value) else a for a in args]
        concretes = prim.impl(*arrays, **attrs)
    node.outputs = [
        Value(shape, dtype, trace, node, None if concretes is None else concretes[i])
        for i, (shape, dtype) in enumerate(out_avals)
    ]
    trace.nodes.append(node)
    return node.outputs if prim.multiple_results else node.outputs[0]


def _has_symbolic(attrs: dict) -> bool:
    for key in ("shape", "stops", "size"):
        v = attrs.get(key)
        if isinstance(v, str) or (isinstance(v, tuple) and any(isinstance(d, str) for d in v)):
            return True
    return False


def _shape_message(prim: Primitive, args, err: Exception) -> str:
    shapes = ", ".join(f"({', '.join(str(d) for d in _aval(a)[0])}) {_aval(a)[1]}" for a in args)
    return f"{prim.name}: {err}; input shapes: {shapes}; at {_user_location()}"


# --------------------------------------------------------------------------------------------
# Shape helpers shared by the shape rules


def broadcast_shapes(*shapes: Shape) -> Shape:
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for axis in range(rank):
        dims = [s[len(s) - rank + axis] for s in shapes if len(s) - rank + axis >= 0]
        dim: Dim = 1
        for d in dims:
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif d != dim:
                raise ShapeError(f"cannot broadcast sizes {dim} and {d} on axis {axis - rank}")
        out.append(dim)
    return tuple(out)


def normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim))
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"axis {a} is out of range for rank {ndim}")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def resolve_shape(shape: Shape, sizes: dict[str, int]) -> tuple[int, ...]:
    """Replace symbolic dims by their bound sizes."""
    out = []
    for d in shape:
        if isinstance(d, str):
            if d not in sizes:
                raise ShapeError(f"symbolic dim {d!r} is not bound by any program input")
            out.append(sizes[d])
        else:
            out.append(d)
    return tuple(out)


def is_float(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def values_in(xs: Sequence[Any]) -> list[Value]:
    return [x for x in xs if isinstance(x, Value)]
