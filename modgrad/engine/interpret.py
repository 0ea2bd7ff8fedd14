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


def program_runner(prog: Program):
    """Return ``run(args) -> outputs``: the program as one generated Python function.

    Each node becomes one call with its operands in local variables. Small loop bodies run
    thousands of times per train step, so the evaluator's own cost per op matters as much as
    numpy's. A scan node also receives the outputs that nothing reads, so it skips stacking them.
    Cached on the program.
    """
    cached = getattr(prog, "_run", None)
    if cached is not None:
        return cached
    names: dict[int, str] = {v.uid: f"a{i}" for i, v in enumerate(prog.inputs)}
    namespace: dict = {"np": np, "bind_sizes": bind_sizes, "resolve_attrs": resolve_attrs, "INPUTS": prog.inputs}
    read = {x.uid for n in prog.nodes for x in n.inputs if isinstance(x, Value)}
    read |= {o.uid for o in prog.outputs if isinstance(o, Value)}
    impls: dict[str, str] = {}
    lines = ["def run(args):"]
    if prog.inputs:
        lines.append(f"    {', '.join(names[v.uid] for v in prog.inputs)}, = [np.asarray(a) for a in args]")
    if any(_needs_sizes(n.attrs) for n in prog.nodes):
        lines.append(f"    sizes = bind_sizes(INPUTS, [{', '.join(names[v.uid] for v in prog.inputs)}])")
    for k, node in enumerate(prog.nodes):
        fn = impls.setdefault(node.prim.name, f"F{len(impls)}")
        namespace[fn] = node.prim.impl
        operands = []
        for j, x in enumerate(node.inputs):
            if isinstance(x, Value):
                operands.append(names[x.uid])
            else:
                namespace[f"C{k}_{j}"] = x
                operands.append(f"C{k}_{j}")
        attrs = dict(node.attrs)
        if node.prim.name == "scan":
            attrs["unread"] = frozenset(i for i, o in enumerate(node.outputs) if o.uid not in read)
        if attrs:
            namespace[f"A{k}"] = attrs
            operands.append(f"**resolve_attrs(A{k}, sizes)" if _needs_sizes(attrs) else f"**A{k}")
        for i, o in enumerate(node.outputs):
            names[o.uid] = f"v{k}_{i}"
        call = f"{fn}({', '.join(operands)})"
        targets = ", ".join(names[o.uid] for o in node.outputs)
        lines.append(f"    {targets}, = {call}" if targets else f"    {call}")
    results = []
    for i, o in enumerate(prog.outputs):
        if isinstance(o, Value):
            results.append(names[o.uid])
        else:
            namespace[f"OUT{i}"] = np.asarray(o)
            results.append(f"OUT{i}")
    lines.append(f"    return [{', '.join(results)}]")
    exec(compile("\n".join(lines), f"<modgrad program {len(prog.nodes)} nodes>", "exec"), namespace)
    prog._run = namespace["run"]
    return prog._run


def run_program(prog: Program, args: list) -> list[np.ndarray]:
    return program_runner(prog)(args)
