"""Reverse-mode differentiation over a trace, and the value_and_grad / grad transforms."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np

from modgrad.engine.core import Node, Trace, TraceError, Value, current_trace, is_float, trace_scope
from modgrad.engine.pytree import tree_flatten, tree_map, tree_unflatten


def zeros_like(x):
    from modgrad.engine.prims.shape import broadcast_to_p
    from modgrad.engine.core import bind

    if not isinstance(x, Value):
        return np.zeros(np.shape(x), np.asarray(x).dtype)
    return bind(broadcast_to_p, np.zeros((), x.dtype), shape=tuple(x.shape))


def lift(x: np.ndarray, trace: Trace) -> Value:
    """Record a constant as a value of ``trace`` so gradients can be taken with respect to it."""
    from modgrad.engine.prims.elementwise import identity_p

    arr = np.asarray(x)
    node = Node(identity_p, [arr], {})
    node.outputs = [Value(arr.shape, arr.dtype, trace, node, arr)]
    trace.nodes.append(node)
    return node.outputs[0]


def backprop(trace: Trace, outputs: Sequence, cotangents: Sequence, wrt: Sequence[Value]) -> list:
    """Return d(sum_i <outputs_i, cotangents_i>)/d(wrt_j) for each j; None where nothing flows."""
    ct: dict[int, object] = {}

    def accumulate(v: Value, c) -> None:
        if tuple(np.shape(c) if not isinstance(c, Value) else c.shape) != tuple(v.shape):
            raise AssertionError(f"cotangent shape {getattr(c, 'shape', None)} != value shape {v.shape}")
        ct[v.uid] = c if v.uid not in ct else ct[v.uid] + c

    for o, c in zip(outputs, cotangents):
        if isinstance(o, Value) and c is not None and is_float(o.dtype):
            accumulate(o, c)

    depends = {w.uid for w in wrt}
    relevant: list[Node] = []
    for node in list(trace.nodes):
        if any(isinstance(x, Value) and x.uid in depends for x in node.inputs):
            relevant.append(node)
            depends.update(o.uid for o in node.outputs)

    for node in reversed(relevant):
        out_cts = [ct.get(o.uid) if is_float(o.dtype) else None for o in node.outputs]
        if all(c is None for c in out_cts):
            continue
        if node.prim.vjp is None:
            raise NotImplementedError(f"{node.prim.name} has no VJP")
        in_cts = node.prim.vjp(node, out_cts)
        for x, c in zip(node.inputs, in_cts):
            if c is None or not isinstance(x, Value) or x.uid not in depends or not is_float(x.dtype):
                continue
            accumulate(x, c)
    return [ct.get(w.uid) for w in wrt]


def _to_numpy(x):
    if isinstance(x, Value):
        if x.concrete is None:
            raise TraceError(f"{x} has no concrete value")
        return x.concrete
    return x


def value_and_grad(fn: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
    """Transform ``fn`` (returning a scalar) into one returning ``(value, grads)``.

    ``grads`` has the structure of the arguments selected by ``argnums`` (a tuple of structures when
    ``argnums`` is a sequence). Called on numpy arrays it runs eagerly with the numpy reference; called
    inside ``compile`` or ``scan`` it records the backward pass into the same program.
    """
    multi = not isinstance(argnums, int)
    nums = tuple(argnums) if multi else (argnums,)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        outer = current_trace()
        trace = outer if outer is not None else Trace(name="value_and_grad")
        scope = nullcontext() if outer is not None else trace_scope(trace)
        with scope:
            args = list(args)
            wrt_groups = []
            for i in nums:
                if i >= len(args):
                    raise ValueError(f"argnums {i} is out of range for {len(args)} positional arguments")
                leaves, td = tree_flatten(args[i])
                lifted = [_as_wrt(leaf, trace) for leaf in leaves]
                wrt_groups.append((td, lifted))
                args[i] = tree_unflatten(td, lifted)
            out = fn(*args, **kwargs)
            aux = None
            if has_aux:
                out, aux = out
            _check_scalar(out)
            wrt = [v for _, group in wrt_groups for v in group]
            seed = np.ones((), out.dtype) if isinstance(out, Value) else None
            grads = backprop(trace, [out], [seed], wrt) if isinstance(out, Value) else [None] * len(wrt)
            grads = [zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]
            trees, k = [], 0
            for td, group in wrt_groups:
                trees.append(tree_unflatten(td, grads[k : k + len(group)]))
                k += len(group)
            grad_tree = tuple(trees) if multi else trees[0]
            result = ((out, aux), grad_tree) if has_aux else (out, grad_tree)
        if outer is None:
            result = tree_map(_to_numpy, result)
        return result

    return wrapped


def grad(fn: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
    """Like ``value_and_grad`` but return only the gradients (and aux when ``has_aux``)."""
    vg = value_and_grad(fn, argnums, has_aux)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out, g = vg(*args, **kwargs)
        return (g, out[1]) if has_aux else g

    return wrapped


def _as_wrt(leaf, trace: Trace) -> Value:
    from modgrad.engine.core import bind
    from modgrad.engine.prims.elementwise import identity_p

    if isinstance(leaf, Value):
        # A fresh identity gives each argument its own cotangent slot, even if a value is passed twice.
        return bind(identity_p, leaf)
    arr = np.asarray(leaf)
    if not is_float(arr.dtype):
        raise TypeError(f"cannot differentiate with respect to an array of dtype {arr.dtype}")
    return lift(arr, trace)


def _check_scalar(out) -> None:
    shape = out.shape if isinstance(out, Value) else np.shape(out)
    if tuple(shape) != ():
        raise ValueError(f"value_and_grad needs a scalar output, got shape {tuple(shape)}")
    dtype = out.dtype if isinstance(out, Value) else np.asarray(out).dtype
    if not is_float(dtype):
        raise ValueError(f"value_and_grad needs a floating output, got {dtype}")
