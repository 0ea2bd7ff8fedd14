"""Helpers shared by the benchmark scripts: JSON-lines output, timing and a machine description.

Every script prints one JSON object per line to stdout, one per measurement, so results can be
piped into a file and compared across machines and commits.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

ROOT = Path(__file__).resolve().parents[1]


def add_repo_to_path() -> None:
    """Let a script run from a checkout (``python bench/x.py``) without installing the package."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def emit(record: dict, out: TextIO | None = None) -> None:
    """Print ``record`` as one JSON line, and append it to ``out`` when given."""
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (Linux), else from ``platform``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Describe the CPU, the core count, the number of MAX accelerators and the library versions."""
    import numpy

    info = {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        import max
        from max.driver import accelerator_count

        info["max"] = getattr(max, "__version__", None) or _max_core_version()
        info["accelerators"] = accelerator_count()
    except ImportError:
        info["max"] = None
        info["accelerators"] = 0
    return info


def _max_core_version() -> str | None:
    try:
        from max import _core

        return _core.__version__
    except (ImportError, AttributeError):
        return None


def time_per_call(fn: Callable[[], object], min_seconds: float = 0.5, repeats: int = 7) -> dict:
    """Time ``fn()`` after one warm-up call; return the median and minimum per call in microseconds.

    Each of ``repeats`` rounds runs ``fn`` back to back for about ``min_seconds / repeats``
    seconds, with the number of calls per round fixed by a calibration run.
    """
    fn()  # warm-up: first-call costs (allocation, lazy imports) are not per-call overhead
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(min_seconds / repeats / once))

    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        per_call.append((time.perf_counter() - start) / number)
    return {
        "median_us": round(statistics.median(per_call) * 1e6, 2),
        "min_us": round(min(per_call) * 1e6, 2),
        "calls": number * repeats,
    }


def matmul_gflop_s(size: int = 2048, repeats: int = 5) -> float:
    """Return numpy's best float32 matmul rate on size x size matrices (all BLAS threads), GFLOP/s."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up: BLAS thread start and page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
