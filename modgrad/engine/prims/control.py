"""scan: a differentiable loop whose body is traced once, whatever the number of steps.

``scan(body, init, xs)`` runs ``carry, y = body(carry, x_t)`` for t = 0..T-1 and returns the final
carry and the ys stacked on a new leading axis. The scan node also outputs each step's incoming
carry (the history). Its VJP is itself a reverse scan, in one of two forms:

- saved residuals (the default when the loop is traced): the forward body is extended to also
  output, per step, the intermediates that the backward step reads, and the backward body reads
  them instead of recomputing the forward step. Intermediates that depend only on loop constants
  (for example a transposed weight) are computed once, outside both loops. A constant's gradient
  made of per-step products (a weight's x_t^T g_t) is summed after the loop as one large
  product of the stacked operands (see ``deferred``), not accumulated step by step.
- recompute (``remat=True``, and for loops that already ran eagerly): the backward body re-runs
  the forward step from the carry history. It uses less memory and runs every forward step twice.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

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
from modgrad.engine.interpret import program_runner
from modgrad.engine.prims.deferred import (
    deferred_sum,
    pack_small_sums,
    producers_of,
    split_gradient,
    unpack_sums,
)
from modgrad.engine.prims.elementwise import add_p
from modgrad.engine.pytree import tree_flatten, tree_unflatten


def _leaf_aval(x):
    if isinstance(x, Value):
        return x.shape, x.dtype
    arr = np.asarray(x)
    return arr.shape, arr.dtype


def _scan_rule(*avals, body: Program, n_consts: int, n_carry: int, length, reverse: bool, remat: bool = False,
               saved: bool = False):
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


def _scan_impl(*args, body: Program, n_consts: int, n_carry: int, length, reverse: bool, remat: bool = False,
               saved: bool = False, unread: frozenset = frozenset()):
    """Run the loop; outputs whose index is in ``unread`` (nothing reads them) come back as None."""
    consts = list(args[:n_consts])
    carry = list(args[n_consts : n_consts + n_carry])
    xs = args[n_consts + n_carry :]
    steps = int(length) if not xs else xs[0].shape[0]
    if steps == 0:
        raise ValueError("scan over zero steps: pass at least one step")
    n_y = len(body.outputs) - n_carry
    keep_history = [n_carry + n_y + i not in unread for i in range(n_carry)]
    history = [[None] * steps if keep else None for keep in keep_history]
    ys: list = [None] * steps
    run = program_runner(body)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        for h, c in zip(history, carry):
            if h is not None:
                h[t] = c
        outs = run(consts + carry + [x[t] for x in xs])
        carry = outs[:n_carry]
        ys[t] = outs[n_carry:]
    stacked_ys = [None if n_carry + j in unread else np.stack([ys[t][j] for t in range(steps)]) for j in range(n_y)]
    stacked_hist = [None if h is None else np.stack(h) for h in history]
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


class _ScanParts(NamedTuple):
    """A scan node's body, inputs and carry history, and which of its values are floating point."""

    body: Program
    n_consts: int
    n_carry: int
    consts: list
    xs: list
    n_y: int
    history: list
    carry_float: list[bool]
    const_float: list[bool]
    x_float: list[bool]
    y_float: list[bool]


def _scan_parts(node: Node) -> _ScanParts:
    a = node.attrs
    body: Program = a["body"]
    nc, ncar = a["n_consts"], a["n_carry"]
    consts = node.inputs[:nc]
    xs = node.inputs[nc + ncar :]
    n_y = len(body.outputs) - ncar
    return _ScanParts(
        body=body,
        n_consts=nc,
        n_carry=ncar,
        consts=consts,
        xs=xs,
        n_y=n_y,
        history=node.outputs[ncar + n_y :],
        carry_float=[is_float(ph.dtype) for ph in body.inputs[nc : nc + ncar]],
        const_float=[isinstance(c, Value) and is_float(c.dtype) for c in consts],
        x_float=[isinstance(x, Value) and is_float(x.dtype) for x in xs],
        y_float=[is_float(_leaf_aval(y)[1]) for y in body.outputs[ncar:]],
    )


def _initial_cotangents(node: Node, cts: list) -> tuple[list, list, list]:
    """Return the backward loop's start: (final-carry cotangents, ys cotangents, zero const sums)."""
    parts = _scan_parts(node)
    ncar, outs = parts.n_carry, node.outputs

    def ct_or_zeros(c, v):
        return c if c is not None else _zeros(v.shape, v.dtype)

    d_final = [ct_or_zeros(cts[i], outs[i]) for i in range(ncar) if parts.carry_float[i]]
    d_ys = [ct_or_zeros(cts[ncar + j], outs[ncar + j]) for j in range(parts.n_y) if parts.y_float[j]]
    acc0 = [_zeros(c.shape, c.dtype) for c, f in zip(parts.consts, parts.const_float) if f]
    return d_final, d_ys, acc0


def _input_cotangents(node: Node, d_init, d_consts, d_xs) -> list:
    """Order the backward loop's results as the scan node's inputs, None for non-float ones."""
    parts = _scan_parts(node)
    d_init_it, d_consts_it, d_xs_it = iter(d_init), iter(d_consts), iter(d_xs)
    result = [next(d_consts_it) if f else None for f in parts.const_float]
    result += [next(d_init_it) if f else None for f in parts.carry_float]
    result += [next(d_xs_it) if f else None for f in parts.x_float]
    return result


def _backward_step(node: Node, trace: Trace, consts: list, h: list, x_t: list, d_carry: list, acc: list,
                   dy: list) -> tuple[list, list, list, list]:
    """Record one backward step of a scan node into ``trace``: its forward body, then backprop.

    h, x_t: the step's incoming carry and xs. d_carry, dy: cotangents of the float carries and
    ys. acc: running sums of the float consts' gradients. Returns (forward outputs, carry
    cotangents, new sums, xs cotangents).
    """
    from modgrad.engine.autodiff import backprop

    parts = _scan_parts(node)
    ncar = parts.n_carry
    fwd = inline(parts.body, list(consts) + h + x_t)
    seeds_out = [o for o, f in zip(fwd[:ncar], parts.carry_float) if f]
    seeds_out += [o for o, f in zip(fwd[ncar:], parts.y_float) if f]
    wrt_c = [v for v, f in zip(consts, parts.const_float) if f]
    wrt_h = [v for v, f in zip(h, parts.carry_float) if f]
    wrt_x = [v for v, f in zip(x_t, parts.x_float) if f]
    grads = backprop(trace, seeds_out, d_carry + dy, wrt_c + wrt_h + wrt_x)
    g_c = grads[: len(wrt_c)]
    g_h = grads[len(wrt_c) : len(wrt_c) + len(wrt_h)]
    g_x = grads[len(wrt_c) + len(wrt_h) :]
    new_acc = [s if g is None else s + g for s, g in zip(acc, g_c)]
    new_d = [_zeros(v.shape, v.dtype) if g is None else g for v, g in zip(wrt_h, g_h)]
    dx = [_zeros(v.shape, v.dtype) if g is None else g for v, g in zip(wrt_x, g_x)]
    return fwd, new_d, new_acc, dx


def _scan_vjp(node: Node, cts: list):
    a = node.attrs
    ran_eagerly = any(o.concrete is not None for o in node.outputs)
    if a.get("remat") or a.get("saved") or ran_eagerly:
        return _scan_vjp_recompute(node, cts)
    result = _scan_vjp_saved(node, cts)
    return _scan_vjp_recompute(node, cts) if result is None else result


def _scan_vjp_recompute(node: Node, cts: list):
    a = node.attrs
    parts = _scan_parts(node)
    consts, xs, history = parts.consts, parts.xs, parts.history
    d_final, d_ys, acc0 = _initial_cotangents(node, cts)

    def backward_step(carry, x):
        d_carry, acc = carry
        h, x_t, dy = x
        trace = current_trace()
        const_vals = [trace.capture(c) if isinstance(c, Value) else c for c in consts]
        _, new_d, new_acc, dx = _backward_step(node, trace, const_vals, list(h), list(x_t), list(d_carry),
                                               list(acc), list(dy))
        return (new_d, new_acc), dx

    (d_init, d_consts), d_xs = scan(
        backward_step,
        (d_final, acc0),
        (list(history), list(xs), d_ys),
        reverse=not a["reverse"],
    )
    return _input_cotangents(node, d_init, d_consts, d_xs)


def _nodes_for(outputs: list, nodes: list[Node], stop: set[int]) -> list[Node]:
    """Return the nodes among ``nodes`` (in their order) that ``outputs`` need, not looking past ``stop`` uids."""
    needed = {o.uid for o in outputs if isinstance(o, Value)} - stop
    keep = []
    for n in reversed(nodes):
        if any(o.uid in needed for o in n.outputs):
            keep.append(n)
            needed.update(x.uid for x in n.inputs if isinstance(x, Value) and x.uid not in stop)
    return keep[::-1]


# Ops that only move or relabel data: the backward step recomputes them from their input instead of
# saving their output, so a value and its views (a transpose, a broadcast) are not stored twice.
_RECOMPUTED = frozenset({"reshape", "transpose", "broadcast_to", "slice", "identity", "stop_gradient", "cast",
                         "size_of"})


def _backward_side(nodes: list[Node], outputs: list, known: set[int], invariant: set[int]):
    """Return (the nodes the backward step runs, {uid: value} of the known values it reads).

    known: uids the forward step can provide. Views of known values (``_RECOMPUTED`` ops) move to
    the backward side unless they depend only on loop constants. ``known`` is updated in place.
    """
    producer = {o.uid: n for n in nodes for o in n.outputs}
    while True:
        backward = _nodes_for(outputs, nodes, known)
        boundary: dict[int, Value] = {}
        for n in backward:
            for x in n.inputs:
                if isinstance(x, Value) and x.uid in known:
                    boundary.setdefault(x.uid, x)
        for o in outputs:
            if isinstance(o, Value) and o.uid in known:
                boundary.setdefault(o.uid, o)
        views = [producer[u] for u in boundary
                 if u in producer and u not in invariant and producer[u].prim.name in _RECOMPUTED]
        if not views:
            return backward, boundary
        for n in views:
            known.difference_update(o.uid for o in n.outputs)


def _scan_vjp_saved(node: Node, cts: list):
    """Build the scan's VJP from the forward step's saved intermediates instead of recomputing them.

    Traces one backward step (the forward body inlined, then backprop) and splits its nodes by
    what they read. Known nodes read only loop constants, the incoming carry and the step's xs:
    they can run in the forward loop. The known values that the rest reads are the residuals.
    Residuals that read only loop constants are computed once before the backward loop. The
    others become extra per-step outputs of the forward scan node, which is rewritten in place.
    Returns None when the step cannot be split this way (it captured a value from outside).
    """
    a = node.attrs
    parts = _scan_parts(node)
    body, nc, ncar, consts, n_y = parts.body, parts.n_consts, parts.n_carry, parts.consts, parts.n_y
    outs = node.outputs
    y_avals = [_leaf_aval(y) for y in body.outputs[ncar:]]

    step = Trace(parent=current_trace(), name="scan backward step")
    with trace_scope(step):
        c_ph = [step.placeholder(*_leaf_aval(c)) for c in consts]
        h_ph = [step.placeholder(ph.shape, ph.dtype) for ph in body.inputs[nc : nc + ncar]]
        x_ph = [step.placeholder(ph.shape, ph.dtype) for ph in body.inputs[nc + ncar :]]
        d_ph = [step.placeholder(v.shape, v.dtype) for v, f in zip(h_ph, parts.carry_float) if f]
        acc_ph = [step.placeholder(v.shape, v.dtype) for v, f in zip(c_ph, parts.const_float) if f]
        dy_ph = [step.placeholder(shape, dt) for (shape, dt), f in zip(y_avals, parts.y_float) if f]
        fwd, new_d, new_acc, dx = _backward_step(node, step, c_ph, h_ph, x_ph, d_ph, acc_ph, dy_ph)
    if step.captures:
        return None
    d_final, d_ys, acc0 = _initial_cotangents(node, cts)  # before the node gains residual outputs

    # Classify every value of the step: constant-only (invariant), forward-known, or backward.
    invariant = {v.uid for v in c_ph}
    known = invariant | {v.uid for v in h_ph + x_ph}
    for n in step.nodes:
        ins = [x.uid for x in n.inputs if isinstance(x, Value)]
        if all(u in known for u in ins):
            known.update(o.uid for o in n.outputs)
            if all(u in invariant for u in ins):
                invariant.update(o.uid for o in n.outputs)

    # Constants' gradients that are sums of per-step products are summed after the loop instead.
    length = a["length"]
    n_sums = len(acc_ph)
    carried, deferred = list(range(n_sums)), {}
    if isinstance(length, int):
        carried = []
        producers = producers_of(step.nodes)
        for i, (running, total) in enumerate(zip(acc_ph, new_acc)):
            in_loop, terms = split_gradient(total, running, producers, invariant)
            if terms:
                deferred[i] = terms
                if in_loop:
                    with trace_scope(step):
                        new_acc[i] = functools.reduce(lambda x, y: bind(add_p, x, y), [running] + in_loop)
            if in_loop or not terms:
                carried.append(i)
    operands = list({v.uid: v for terms in deferred.values() for t in terms for v in t.operands}.values())
    per_step = [v for v in operands if v.uid not in known]  # computed by the backward step
    forward_operands = [v for v in operands if v.uid in known]  # stacked by the forward loop
    acc_ph, new_acc, acc0 = ([seq[i] for i in carried] for seq in (acc_ph, new_acc, acc0))
    packed = None
    # The numpy evaluator pays about as much for each of the packing's reshapes as for an add.
    if step.device != "numpy":
        acc_ph, new_acc, acc0, packed = pack_small_sums(step, acc_ph, new_acc, acc0)
    if packed is not None:
        packed_consts = [carried[i] for i in packed.positions]  # the constants' indices
        packed_set = set(packed_consts)
        carried = [c for c in carried if c not in packed_set]
    bwd_outputs = new_d + new_acc + dx + per_step
    backward_nodes, boundary = _backward_side(step.nodes, bwd_outputs, known, invariant)

    const_in, const_outer, xs_in, xs_outer = [], [], [], []
    hoisted, residuals = [], []
    slots = {v.uid: ("const", i) for i, v in enumerate(c_ph)}
    slots.update({v.uid: ("history", i) for i, v in enumerate(h_ph)})
    slots.update({v.uid: ("xs", i) for i, v in enumerate(x_ph)})
    stacked: dict[int, Value] = {}  # uid of a deferred operand -> its (T, ...) stack
    for uid, v in boundary.items():
        kind, i = slots.get(uid, ("hoist" if uid in invariant else "residual", -1))
        if kind == "const":
            const_in.append(v)
            const_outer.append(consts[i])
        elif kind == "hoist":
            hoisted.append(v)
        elif kind == "history":
            xs_in.append(v)
            xs_outer.append(parts.history[i])
        elif kind == "xs":
            xs_in.append(v)
            xs_outer.append(parts.xs[i])
        else:
            residuals.append(v)
    for v in forward_operands:
        kind, i = slots.get(v.uid, ("residual", -1))
        if kind == "history":
            stacked[v.uid] = parts.history[i]
        elif kind == "xs":
            stacked[v.uid] = parts.xs[i]
        elif kind == "residual" and v.uid not in boundary:
            residuals.append(v)

    # Constant-only residuals: computed once, in the enclosing trace.
    if hoisted:
        prog = Program(list(c_ph), _nodes_for(hoisted, step.nodes, {v.uid for v in c_ph}), hoisted)
        const_in += hoisted
        const_outer += inline(prog, list(consts))

    # The forward node now also outputs the per-step residuals.
    if residuals:
        fwd_outputs = list(fwd) + residuals
        fwd_body = Program(c_ph + h_ph + x_ph, _nodes_for(fwd_outputs, step.nodes, set()), fwd_outputs)
        owner = outs[0].trace
        residual_stacks = [Value((length,) + tuple(v.shape), v.dtype, owner, node, None) for v in residuals]
        node.outputs = outs[: ncar + n_y] + residual_stacks + outs[ncar + n_y :]
        node.attrs = {**a, "body": fwd_body, "saved": True}
        for v, s in zip(residuals, residual_stacks):
            stacked[v.uid] = s
            if v.uid in boundary:
                xs_in.append(v)
                xs_outer.append(s)

    bwd_body = Program(const_in + d_ph + acc_ph + xs_in + dy_ph, backward_nodes, bwd_outputs)
    bwd = bind(
        scan_p,
        *const_outer,
        *d_final,
        *acc0,
        *xs_outer,
        *d_ys,
        body=bwd_body,
        n_consts=len(const_in),
        n_carry=len(d_ph) + len(acc_ph),
        length=length,
        reverse=not a["reverse"],
        remat=False,
    )
    n_carry = len(d_ph) + len(acc_ph)
    n_dx = len(dx)
    stacked.update((v.uid, s) for v, s in zip(per_step, bwd[n_carry + n_dx : n_carry + n_dx + len(per_step)]))
    sums = dict(zip(carried, bwd[len(d_ph) : n_carry]))  # stops before a packed carry, which is last
    if packed is not None:
        sums.update(zip(packed_consts, unpack_sums(bwd[n_carry - 1], packed)))
    d_consts = []
    for i in range(n_sums):
        total = sums.get(i)
        if i in deferred:
            later = deferred_sum(deferred[i], stacked)
            total = later if total is None else bind(add_p, total, later)
        d_consts.append(total)
    return _input_cotangents(node, bwd[: len(d_ph)], d_consts, bwd[n_carry : n_carry + n_dx])


scan_p = register(Primitive("scan", _scan_rule, _scan_impl, _scan_vjp, multiple_results=True))


def scan(body_fn: Callable, init, xs=None, length: int | None = None, reverse: bool = False, unroll: bool = False,
         remat: bool = False):
    """Loop ``carry, y = body_fn(carry, x)`` over the leading axis of ``xs`` (or ``length`` steps).

    ``init`` and ``xs`` are trees of arrays or values. Returns ``(final_carry, ys)`` with ys stacked
    along a new leading axis of size T. The body is traced once, so compiling a scan costs the same
    for 4 or 4,000 steps. ``unroll=True`` instead calls the body T times in Python: one larger
    straight-line program, worth it for a handful of steps because each compiled loop step costs
    a separate graph call. ``remat=True`` makes the gradient recompute each step's forward
    instead of storing its intermediates (see the module docstring).
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
        remat=remat,
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
