"""MAX lowering of the engine's primitives: one function per primitive, grouped by op family.

``lower(name, args, attrs, device)`` turns one recorded primitive into ``max.graph`` values inside
the graph under construction. This package depends only on MAX and the primitive names. It never imports the
model code.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorValue, ops

LOWERINGS: dict[str, Callable] = {}

# Part of the compiled-program cache key: bump it whenever a lowering changes what it emits.
LOWERING_VERSION = 8

_DTYPES = {
    np.dtype(np.float32): DType.float32,
    np.dtype(np.float64): DType.float64,
    np.dtype(np.float16): DType.float16,
    np.dtype(np.int64): DType.int64,
    np.dtype(np.int32): DType.int32,
    np.dtype(np.int8): DType.int8,
    np.dtype(np.uint8): DType.uint8,
    np.dtype(bool): DType.bool,
}


def to_max_dtype(dtype) -> DType:
    try:
        return _DTYPES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no MAX equivalent; use float32/float64/int64/int32/bool") from None


def lowering(name: str):
    def deco(fn):
        LOWERINGS[name] = fn
        return fn

    return deco


def constant(array: np.ndarray, device: DeviceRef) -> TensorValue:
    arr = np.asarray(array, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    if arr.ndim == 0:
        # ops.constant gives a 0-d numpy array the shape (1,) but keeps a Python scalar 0-d.
        return ops.constant(arr.item(), to_max_dtype(arr.dtype), device)
    return ops.constant(arr, to_max_dtype(arr.dtype), device)


def lower(name: str, args: list, attrs: dict, device: DeviceRef) -> list[TensorValue]:
    """Emit the MAX ops for primitive ``name``; numpy constants in ``args`` become graph constants."""
    fn = LOWERINGS.get(name)
    if fn is None:
        raise NotImplementedError(f"primitive {name!r} has no MAX lowering")
    values = [constant(a, device) if isinstance(a, np.ndarray) else a for a in args]
    out = fn(*values, device=device, **attrs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


from modgrad.graphs import attention, elementwise, fused, linalg, norm, reduce, shape  # noqa: E402,F401  (registers the lowerings)
