"""Gradients of loop constants summed after a backward loop, as one large product each.

A weight W that a loop step uses as ``x_t @ W`` gets the gradient sum_t x_t^T g_t. Summed inside
the backward loop, that is one small product per step (x_t has a batch of rows), far below the
machine's matmul rate. Stacking x_t and g_t over the steps instead gives the same sum as one
(K, T*M) @ (T*M, N) product after the loop. A bias's gradient, the sum of g_t over its rows,
likewise becomes one reduction of the stacked g_t.

``split_gradient`` finds such terms in the gradient a backward step adds to a constant's
running sum, and ``deferred_sum`` builds their total from the stacked per-step operands.

The running sums that stay in the loop and hold few values each (a layer norm's scale and
shift, per layer) are packed into one flat carry by ``pack_small_sums``, up to
``PACK_MAX_SUMS`` of them: the backward step adds them with one op and passes one value on,
instead of an add and a loop value per constant. ``unpack_sums`` cuts the packed total apart after the loop. Compiled programs pack.
Programs for the numpy evaluator do not: it pays per op for the packing's reshapes much as for
the adds they replace, and an 8-region maze brain's step took 1.08 s packed against 1.04 s.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from modgrad.engine.core import Node, Trace, Value, bind, trace_scope
from modgrad.engine.prims.elementwise import add_p
from modgrad.engine.prims.linalg import matmul_p
from modgrad.engine.prims.reduce import reduce_sum_p
from modgrad.engine.prims.shape import broadcast_to_p, concat_p, reshape_p, slice_p, transpose_p


class Term(NamedTuple):
    """One summand of a constant's gradient, computed from per-step values.

    kind "matmul": operands (a, b) with the step's term a @ b. An operand whose ``transposed``
    entry is True is stored as the value it transposes. kind "sum": operands (c,) and the term
    is the sum of c over ``axes``.
    """

    kind: str
    operands: tuple[Value, ...]
    transposed: tuple[bool, ...] = ()
    axes: tuple[int, ...] = ()


def _summands(value: Value, producers: dict[int, Node]) -> list[Value]:
    """Flatten a tree of same-shaped additions into its summands."""
    node = producers.get(value.uid)
    if node is None or node.prim is not add_p:
        return [value]
    if not all(isinstance(x, Value) and tuple(x.shape) == tuple(value.shape) for x in node.inputs):
        return [value]
    return [s for x in node.inputs for s in _summands(x, producers)]


def _untransposed(value: Value, producers: dict[int, Node]) -> tuple[Value, bool]:
    node = producers.get(value.uid)
    if node is not None and node.prim is transpose_p and tuple(node.attrs["perm"]) == (1, 0):
        return node.inputs[0], True
    return value, False


def _as_term(value: Value, producers: dict[int, Node], invariant: set[int]) -> Term | None:
    node = producers.get(value.uid)
    if node is None or not all(isinstance(x, Value) and x.uid not in invariant for x in node.inputs):
        return None
    if node.prim is matmul_p:
        a, b = node.inputs
        if len(a.shape) != 2 or len(b.shape) != 2 or not isinstance(a.shape[1], int):
            return None
        (a, ta), (b, tb) = _untransposed(a, producers), _untransposed(b, producers)
        return Term("matmul", (a, b), (ta, tb))
    if node.prim is reduce_sum_p and not node.attrs["keepdims"]:
        (c,) = node.inputs
        if all(isinstance(c.shape[i], int) for i in node.attrs["axes"]):
            return Term("sum", (c,), axes=tuple(node.attrs["axes"]))
    return None


def producers_of(nodes: list[Node]) -> dict[int, Node]:
    """Map the uid of every output of ``nodes`` to the node that computes it."""
    return {o.uid: n for n in nodes for o in n.outputs}


def split_gradient(total: Value, running: Value, producers: dict[int, Node], invariant: set[int]):
    """Split ``total`` = running + gradient into (summands left in the loop, deferred terms).

    producers: ``producers_of`` the backward step's nodes. invariant: uids of values that depend
    only on loop constants, which are not stacked. Returns ([], []) when ``total`` is not such a sum.
    """
    node = producers.get(total.uid)
    if node is None or node.prim is not add_p or not isinstance(node.inputs[0], Value) or node.inputs[0].uid != running.uid:
        return [], []
    in_loop, deferred = [], []
    for summand in _summands(node.inputs[1], producers):
        term = _as_term(summand, producers, invariant)
        if term is None:
            in_loop.append(summand)
        else:
            deferred.append(term)
    return in_loop, deferred


def _merge_steps(stacked: Value, transposed: bool, left: bool) -> Value:
    """Fold the step axis into the contraction of a stacked matmul operand.

    stacked is (T, r, c): the per-step operand, or the value it transposes. Returns (K, T*M) for
    the left operand and (T*M, N) for the right one.
    """
    steps, rows, cols = stacked.shape
    if left == transposed:  # the contraction is axis 1: left X^T with X (M, K), or right B (M, N)
        merged = bind(reshape_p, stacked, shape=(steps * rows, cols))
        return bind(transpose_p, merged, perm=(1, 0)) if left else merged
    swapped = bind(transpose_p, stacked, perm=(1, 0, 2))  # the contraction is axis 2
    merged = bind(reshape_p, swapped, shape=(rows, steps * cols))
    return merged if left else bind(transpose_p, merged, perm=(1, 0))


def deferred_sum(terms: list[Term], stacked: dict[int, Value]) -> Value:
    """Return the sum over steps of every term; stacked maps an operand's uid to its (T, ...) stack."""
    total = None
    for term in terms:
        if term.kind == "matmul":
            a = _merge_steps(stacked[term.operands[0].uid], term.transposed[0], left=True)
            b = _merge_steps(stacked[term.operands[1].uid], term.transposed[1], left=False)
            part = bind(matmul_p, a, b)
        else:
            axes = (0,) + tuple(i + 1 for i in term.axes)
            part = bind(reduce_sum_p, stacked[term.operands[0].uid], axes=axes, keepdims=False)
        total = part if total is None else bind(add_p, total, part)
    return total


# Running sums of at most this many values are packed. Packing copies each gradient once more
# per step (the concat), which pays while an add of its own costs more to launch than to run.
# NOTE: the limit was not searched for. A larger sum still costs a pass per step, 170-260 us for
# an NLM weight of 512 x 25 x 64 values. A fused op that adds into the running sum would save it.
PACK_ELEMENTS = 65_536
# At most this many sums go into the packed carry, and the rest keep an add each. MAX 26.7
# compiles a concat of many inputs slowly (2-core CPU): 16 flat inputs took 25 s and 1.2 GB,
# 64 took 61 s and 3.0 GB. The 254 of an eight-region brain's backward step ran past 17 GB.
PACK_MAX_SUMS = 64


class Packed(NamedTuple):
    """Running sums packed into one flat carry: their positions in the carried lists and shapes."""

    positions: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]


def _increments(total: Value, running: Value, producers: dict[int, Node]) -> list[Value] | None:
    """Return the values that ``total`` adds to ``running`` (total = ((running + a) + b) ...), else None."""
    found = []
    value = total
    while True:
        node = producers.get(value.uid)
        if node is None or node.prim is not add_p:
            return None
        left, right = node.inputs
        if not (isinstance(left, Value) and isinstance(right, Value)):
            return None
        if tuple(right.shape) != tuple(running.shape) or right.dtype != running.dtype:
            return None
        found.append(right)
        if left.uid == running.uid:
            return found
        value = left


def pack_small_sums(step: Trace, running: list[Value], totals: list[Value], initial: list[Value]):
    """Pack the small running sums of a backward step into one flat carry, appended last.

    running: the step's placeholders of the sums. totals: the step's new sums, running plus
    this step's gradient. initial: the sums before the loop, zeros in the enclosing trace.
    Returns the three lists, each with the packed sums removed and the packed carry appended,
    and a ``Packed``. When fewer than two sums qualify it returns them unchanged and None.
    """
    producers = producers_of(step.nodes)
    chosen, pieces = [], []
    for i, (ph, total) in enumerate(zip(running, totals)):
        shape = tuple(ph.shape)
        if not all(isinstance(d, int) for d in shape) or int(np.prod(shape)) > PACK_ELEMENTS:
            continue
        if chosen and ph.dtype != running[chosen[0]].dtype:
            continue
        increments = _increments(total, ph, producers)
        if increments is not None and len(chosen) < PACK_MAX_SUMS:
            chosen.append(i)
            pieces.append(increments)
    if len(chosen) < 2:
        return running, totals, initial, None
    dtype = running[chosen[0]].dtype
    shapes = tuple(tuple(running[i].shape) for i in chosen)
    size = sum(int(np.prod(shape)) for shape in shapes)
    with trace_scope(step):
        flat = []
        for increments, shape in zip(pieces, shapes):
            summed = increments[0]
            for extra in increments[1:]:
                summed = bind(add_p, summed, extra)
            flat.append(bind(reshape_p, summed, shape=(int(np.prod(shape)),)))
        packed_running = step.placeholder((size,), dtype)
        packed_total = bind(add_p, packed_running, bind(concat_p, *flat, axis=0))
    packed_initial = bind(broadcast_to_p, np.zeros((), dtype), shape=(size,))
    packed_set = set(chosen)
    keep = [i for i in range(len(running)) if i not in packed_set]
    running = [running[i] for i in keep] + [packed_running]
    totals = [totals[i] for i in keep] + [packed_total]
    initial = [initial[i] for i in keep] + [packed_initial]
    return running, totals, initial, Packed(tuple(chosen), shapes)


def unpack_sums(packed_total: Value, packed: Packed) -> list[Value]:
    """Cut the packed carry's final value back into the sums, in ``packed.positions`` order."""
    sums, start = [], 0
    for shape in packed.shapes:
        size = int(np.prod(shape))
        piece = bind(slice_p, packed_total, starts=(start,), stops=(start + size,))
        sums.append(bind(reshape_p, piece, shape=shape))
        start += size
    return sums
