"""Run a recorded Program with the numpy implementations (the reference evaluator)."""

from __future__ import annotations

import numpy as np

from modgrad.engine.core import Program, ShapeError, Value, resolve_shape

_SHAPE_ATTRS = ("shape", "stops")


def bind_sizes(placeholders: list[Value], arrays: list[np.ndarray]) -> dict[str, int]:
    """Match placeholder shapes against array shapes; return the size bound to each symbolic dim."""
    sizes: dict[str, int] = {}
    for ph, arr in zip(placeholders, arrays):
        if len(ph.shape) != np.ndim(arr):
            raise ShapeError(f"program input expects rank {len(ph.shape)} {ph.shape}, got shape {np.shape(arr)}")
        for d, n in zip(ph.shape, np.shape(arr)):
            if isinstance(d, str):
                if sizes.setdefault(d, n) != n:
                    raise ShapeError(f"symbolic dim {d!r} bound to both {sizes[d]} and {n}")
            elif d != n:
                raise ShapeError(f"program input expects shape {ph.shape}, got {np.shape(arr)}")
    return sizes


def resolve_attrs(attrs: dict, sizes: dict[str, int]) -> dict:
    out = dict(attrs)
    for key in _SHAPE_ATTRS:
        if key in out and any(isinstance(d, str) for d in out[key]):
            out[key] = resolve_shape(out[key], sizes)
    if isinstance(out.get("size"), str):
        out["size"] = resolve_shape((out["size"],), sizes)[0]
    return out


def _needs_sizes(attrs: dict) -> bool:
    for key in _SHAPE_ATTRS:
        if key in attrs and any(isinstance(d, str) for d in attrs[key]):
            return True
    return isinstance(attrs.get("size"), str)


def _prepare(prog: Program) -> list:
    """Number every value once so each run is a flat loop over slots (cached on the program)."""
    cached = getattr(prog, "_steps", None)
    if cached is not None:
        return cached
    slot: dict[int, int] = {v.uid: i for i, v in enumerate(prog.inputs)}
    consts: list = []
    steps = []
    for node in prog.nodes:
        refs = []
        for x in node.inputs:
            if isinstance(x, Value):
                refs.append(slot[x.uid])
            else:
                consts.append(x)
                refs.append(-len(consts))  # negative: a constant
        outs = []
        for v in node.outputs:
            slot[v.uid] = len(slot)
            outs.append(slot[v.uid])
        steps.append((node.prim.impl, refs, node.attrs, _needs_sizes(node.attrs), outs))
    out_refs = [slot[o.uid] if isinstance(o, Value) else o for o in prog.outputs]
    prog._steps = (steps, consts, len(slot), out_refs)
    return prog._steps


def run_program(prog: Program, args: list) -> list[np.ndarray]:
    arrays = [np.asarray(a) for a in args]
    steps, consts, n_slots, out_refs = _prepare(prog)
    sizes = bind_sizes(prog.inputs, arrays) if any(s[3] for s in steps) else {}
    env: list = arrays + [None] * (n_slots - len(arrays))
    for impl, refs, attrs, needs_sizes, outs in steps:
        ins = [env[r] if r >= 0 else consts[-r - 1] for r in refs]
        results = impl(*ins, **(resolve_attrs(attrs, sizes) if needs_sizes else attrs))
        for o, value in zip(outs, results):
            env[o] = value
    return [env[r] if isinstance(r, int) else np.asarray(r) for r in out_refs]
