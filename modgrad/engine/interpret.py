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


def run_program(prog: Program, args: list) -> list[np.ndarray]:
    arrays = [np.asarray(a) for a in args]
    sizes = bind_sizes(prog.inputs, arrays)
    env: dict[int, np.ndarray] = {v.uid: a for v, a in zip(prog.inputs, arrays)}
    for node in prog.nodes:
        ins = [env[x.uid] if isinstance(x, Value) else x for x in node.inputs]
        outs = node.prim.impl(*ins, **resolve_attrs(node.attrs, sizes))
        for v, o in zip(node.outputs, outs):
            env[v.uid] = o
    return [env[o.uid] if isinstance(o, Value) else np.asarray(o) for o in prog.outputs]
