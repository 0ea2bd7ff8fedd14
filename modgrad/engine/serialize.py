"""A stable fingerprint of a Program, used as the key of the compiled-program disk cache."""

from __future__ import annotations

import hashlib

import numpy as np

from modgrad.engine.core import Program, Value


def _attr_repr(value) -> str:
    if isinstance(value, Program):
        return "program:" + program_fingerprint(value)
    if isinstance(value, np.dtype) or isinstance(value, type):
        return f"dtype:{np.dtype(value).str}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_attr_repr(v) for v in value) + ")"
    return repr(value)


def program_fingerprint(prog: Program) -> str:
    h = hashlib.sha256()
    ids: dict[int, int] = {}

    def ref(x) -> str:
        if isinstance(x, Value):
            if x.uid not in ids:
                return f"free:{x.shape}:{x.dtype.str}"
            return f"v{ids[x.uid]}"
        arr = np.ascontiguousarray(x)
        digest = hashlib.sha256(arr.tobytes()).hexdigest()[:16]
        return f"c:{arr.shape}:{arr.dtype.str}:{digest}"

    for v in prog.inputs:
        ids[v.uid] = len(ids)
        h.update(f"in {v.shape} {v.dtype.str};".encode())
    for node in prog.nodes:
        attrs = ",".join(f"{k}={_attr_repr(v)}" for k, v in sorted(node.attrs.items()))
        args = ",".join(ref(x) for x in node.inputs)
        for o in node.outputs:
            ids[o.uid] = len(ids)
        h.update(f"{node.prim.name}[{attrs}]({args});".encode())
    h.update(("out " + ",".join(ref(o) for o in prog.outputs)).encode())
    return h.hexdigest()
