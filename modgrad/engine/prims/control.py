"""scan: a differentiable loop whose body is traced once, whatever the number of steps.

``scan(body, init, xs)`` runs ``carry, y = body(carry, x_t)`` for t = 0..T-1 and returns the final
carry and the ys stacked on a new leading axis. The scan node also outputs each step's incoming
carry (the history) so that its VJP, itself a reverse scan, can recompute the body step by step
instead of storing every intermediate of every tick.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from modgrad.engine.core import (
    Node,
    Primitive,
    Program,
    ShapeError,
    Trace,
    Value,
    bind,
    current_trace,
    is_float,
    register,
    trace_scope,
)
from modgrad.engine.interpret import run_program
from modgrad.engine.pytree import tree_flatten, tree_unflatten


def _leaf_aval(x):
    if isinstance(x, Value):
        return x.shape, x.dtype
    arr = np.asarray(x)
    return arr.shape, arr.dtype


def _scan_rule(*avals, body: Program, n_consts: int, n_carry: int, length, reverse: bool):
    carries = avals[n_consts : n_consts + n_carry]
    for (shape, dtype), ph, out in zip(carries, body.inputs[n_consts:], body.outputs[:n_carry]):
        out_shape, out_dtype = _leaf_aval(out)
        if tuple(shape) != tuple(ph.shape) or dtype != ph.dtype:
            raise ShapeError(f"scan carry {shape} {dtype} does not match body input {ph.shape} {ph.dtype}")
        if tuple(out_shape) != tuple(shape) or out_dtype != dtype:
            raise ShapeError(f"scan body returns carry {out_shape} {out_dtype} for input carry {shape} {dtype}")
    ys = [((length,) + tuple(_leaf_aval(y)[0]), _leaf_aval(y)[1]) for y in body.outputs[n_carry:]]
    history = [((length,) + tuple(shape), dtype) for shape, dtype in carries]
    return list(carries) + ys + history


def _scan_impl(*args, body: Program, n_consts: int, n_carry: int, length, reverse: bool):
    consts = list(args[:n_consts])
    carry = list(args[n_consts : n_consts + n_carry])
    xs = args[n_consts + n_carry :]
    steps = int(length) if not xs else xs[0].shape[0]
    history = [[None] * steps for _ in carry]
    ys: list = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        for i, c in enumerate(carry):
            history[i][t] = c
        outs = run_program(body, consts + carry + [x[t] for x in xs])
        carry = outs[:n_carry]
        ys[t] = outs[n_carry:]
    n_y = len(body.outputs) - n_carry
    if steps == 0:
        raise ValueError("scan over zero steps: pass at least one step")
    stacked_ys = [np.stack([ys[t][j] for t in range(steps)]) for j in range(n_y)]
    stacked_hist = [np.stack(h) for h in history]
    return carry + stacked_ys + stacked_hist


def inline(prog: Program, args: list) -> list:
    """Re-record the nodes of ``prog`` into the active trace with ``args`` as its inputs."""
    env = {v.uid: a for v, a in zip(prog.inputs, args)}
    for node in prog.nodes:
        ins = [env[x.uid] if isinstance(x, Value) else x for x in node.inputs]
        outs = bind(node.prim, *ins, **node.attrs)
        outs = outs if node.prim.multiple_results else [outs]
        for v, o in zip(node.outputs, outs):
            env[v.uid] = o
    return [env.get(o.uid, o) if isinstance(o, Value) else o for o in prog.outputs]


def _zeros(shape, dtype):
    from modgrad.engine.prims.shape import broadcast_to_p

    return bind(broadcast_to_p, np.zeros((), dtype), shape=tuple(shape))


def _scan_vjp(node: Node, cts: list):
    from modgrad.engine.autodiff import backprop

    a = node.attrs
    body: Program = a["body"]
    nc, ncar = a["n_consts"], a["n_carry"]
    consts = node.inputs[:nc]
    xs = node.inputs[nc + ncar :]
    n_y = len(body.outputs) - ncar
    outs = node.outputs
    history = outs[ncar + n_y :]
    y_avals = [_leaf_aval(y) for y in body.outputs[ncar:]]

    carry_float = [is_float(ph.dtype) for ph in body.inputs[nc : nc + ncar]]
    const_float = [isinstance(c, Value) and is_float(c.dtype) for c in consts]
    x_float = [isinstance(x, Value) and is_float(x.dtype) for x in xs]
    y_float = [is_float(dt) for _, dt in y_avals]

    def ct_or_zeros(c, v):
        return c if c is not None else _zeros(v.shape, v.dtype)

    d_final = [ct_or_zeros(cts[i], outs[i]) for i in range(ncar) if carry_float[i]]
    d_ys = [ct_or_zeros(cts[ncar + j], outs[ncar + j]) for j in range(n_y) if y_float[j]]
    acc0 = [_zeros(c.shape, c.dtype) for c, f in zip(consts, const_float) if f]

    def backward_step(carry, x):
        d_carry, acc = carry
        h, x_t, dy = x
        trace = current_trace()
        const_vals = [trace.capture(c) if isinstance(c, Value) else c for c in consts]
        fwd = inline(body, const_vals + list(h) + list(x_t))
        seeds_out = [o for o, f in zip(fwd[:ncar], carry_float) if f] + [
            o for o, f in zip(fwd[ncar:], y_float) if f
        ]
        seeds = list(d_carry) + list(dy)
        wrt_c = [v for v, f in zip(const_vals, const_float) if f]
        wrt_h = [v for v, f in zip(h, carry_float) if f]
        wrt_x = [v for v, f in zip(x_t, x_float) if f]
        grads = backprop(trace, seeds_out, seeds, wrt_c + wrt_h + wrt_x)
        g_c = grads[: len(wrt_c)]
        g_h = grads[len(wrt_c) : len(wrt_c) + len(wrt_h)]
        g_x = grads[len(wrt_c) + len(wrt_h) :]
        new_acc = [s if g is None else s + g for s, g in zip(acc, g_c)]
        new_d = [_zeros(v.shape, v.dtype) if g is None else g for v, g in zip(wrt_h, g_h)]
        dx = [_zeros(v.shape, v.dtype) if g is None else g for v, g in zip(wrt_x, g_x)]
        return (new_d, new_acc), dx

    (d_init, d_consts), d_xs = scan(
        backward_step,
        (d_final, acc0),
        (list(history), list(xs), d_ys),
        reverse=not a["reverse"],
    )
    d_init_it, d_consts_it, d_xs_it = iter(d_init), iter(d_consts), iter(d_xs)
    result = [next(d_consts_it) if f else None for f in const_float]
    result += [next(d_init_it) if f else None for f in carry_float]
    result += [next(d_xs_it) if f else None for f in x_float]
    return result


scan_p = register(Primitive("scan", _scan_rule, _scan_impl, _scan_vjp, multiple_results=True))


def scan(body_fn: Callable, init, xs=None, length: int | None = None, reverse: bool = False, unroll: bool = False):
    """Loop ``carry, y = body_fn(carry, x)`` over the leading axis of ``xs`` (or ``length`` steps).

    ``init`` and ``xs`` are trees of arrays or values. Returns ``(final_carry, ys)`` with ys stacked
    along a new leading axis of size T. The body is traced once, so compiling a scan costs the same
    for 4 or 4,000 steps. ``unroll=True`` instead calls the body T times in Python: one larger
    straight-line program, worth it for a handful of steps because each compiled loop step costs
    a separate graph call.
    """
    if unroll:
        return _unrolled(body_fn, init, xs, length, reverse)
    init_leaves, init_td = tree_flatten(init)
    xs_leaves, xs_td = tree_flatten(xs)
    if xs_leaves:
        steps = _leaf_aval(xs_leaves[0])[0][0]
        for leaf in xs_leaves:
            if _leaf_aval(leaf)[0][0] != steps:
                raise ShapeError(f"scan xs disagree on the number of steps: {steps} vs {_leaf_aval(leaf)[0][0]}")
        if length is not None and length != steps:
            raise ShapeError(f"scan length={length} but xs have {steps} steps")
    elif length is None:
        raise ValueError("scan needs xs or length")
    else:
        steps = length
    if isinstance(steps, int) and steps < 1:
        raise ValueError(f"scan needs at least one step, got {steps}")

    body_trace = Trace(parent=current_trace(), name="scan body")
    with trace_scope(body_trace):
        carry_ph = [body_trace.placeholder(*_leaf_aval(c)) for c in init_leaves]
        x_ph = [body_trace.placeholder(_leaf_aval(x)[0][1:], _leaf_aval(x)[1]) for x in xs_leaves]
        x_tree = tree_unflatten(xs_td, x_ph) if xs is not None else None
        out = body_fn(tree_unflatten(init_td, carry_ph), x_tree)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("scan body must return (carry, y)")
        new_carry, y = out
        nc_leaves, nc_td = tree_flatten(new_carry)
        if nc_td != init_td:
            raise ShapeError("scan body returned a carry whose structure differs from init")
        nc_leaves = [_match_dtype(n, c) for n, c in zip(nc_leaves, carry_ph)]
        y_leaves, y_td = tree_flatten(y)

    captured = list(body_trace.captures.values())
    body = Program(
        inputs=[ph for _, ph in captured] + carry_ph + x_ph,
        nodes=body_trace.nodes,
        outputs=list(nc_leaves) + list(y_leaves),
    )
    outs = bind(
        scan_p,
        *[outer for outer, _ in captured],
        *init_leaves,
        *xs_leaves,
        body=body,
        n_consts=len(captured),
        n_carry=len(init_leaves),
        length=steps,
        reverse=reverse,
    )
    n = len(init_leaves)
    final = tree_unflatten(init_td, outs[:n])
    ys = tree_unflatten(y_td, outs[n : n + len(y_leaves)])
    return final, ys


def _match_dtype(out, placeholder: Value):
    if isinstance(out, Value):
        return out
    arr = np.asarray(out)
    if arr.dtype != placeholder.dtype:
        arr = arr.astype(placeholder.dtype)
    return np.broadcast_to(arr, placeholder.shape).copy() if arr.shape != placeholder.shape else arr


def _unrolled(body_fn: Callable, init, xs, length, reverse: bool):
    from modgrad import ops

    xs_leaves, xs_td = tree_flatten(xs)
    steps = _leaf_aval(xs_leaves[0])[0][0] if xs_leaves else length
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"unroll needs a static number of steps >= 1, got {steps}")
    carry = init
    ys: list = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        x_t = tree_unflatten(xs_td, [x[t] for x in xs_leaves]) if xs is not None else None
        carry, ys[t] = body_fn(carry, x_t)
    y_leaves = [tree_flatten(y)[0] for y in ys]
    y_td = tree_flatten(ys[0])[1]
    stacked = [ops.stack([leaves[j] for leaves in y_leaves], 0) for j in range(len(y_leaves[0]))]
    return carry, tree_unflatten(y_td, stacked)
