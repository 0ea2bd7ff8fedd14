"""Cold and warm compile time of a recurrent program (mg.scan) at several step counts.

The program is the loss and gradient of a recurrent cell with decaying accumulators, looped
over T steps by ``mg.scan``. T is a static shape, so every step count is a different program.
Each measurement runs in its own Python process:

- cold: fresh, empty MODGRAD_CACHE_DIR and MODULAR_CACHE_DIR, so every MAX graph compiles;
- warm: a second process given the same two cache directories, so every graph loads from disk.

Output: one JSON line for the machine, then one line per (steps, cache) with these fields.
  first_call_s     wall seconds of the first call (trace, compile or load every graph, run once)
  run_s            wall seconds of the second call (execution only)
  compile_s        first_call_s - run_s, the cost of preparing the program
  first_call_cpu_s CPU seconds (user + system, all threads) of the first call, which is steadier
                   than wall time on a shared machine
  graphs_compiled  MAX graphs compiled in the child
  mef_loads        compiled graphs loaded from the MODGRAD_CACHE_DIR disk cache
  process_s        wall seconds of the whole child process, imports included

    python bench/compile_time.py                     # steps 4, 16, 64
    python bench/compile_time.py --steps 16 --hidden 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import add_repo_to_path, emit, machine_info

add_repo_to_path()


def child(steps: int, hidden: int, batch: int) -> dict:
    """Build and call the program once per cache state; return the timings (runs in the child)."""
    import resource

    import numpy as np

    import modgrad as mg
    from modgrad import ops
    from modgrad.engine import compile as engine_compile

    inputs, classes = 16, 10
    rng = np.random.default_rng(0)
    params = {
        "wx": (rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype(np.float32),
        "wh": (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32),
        "b": np.zeros(hidden, np.float32),
        "decay": rng.uniform(0.0, 3.0, hidden).astype(np.float32),
        "wout": (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
    }
    xs = rng.standard_normal((steps, batch, inputs)).astype(np.float32)
    targets = rng.integers(0, classes, (steps, batch))

    def loss_fn(p, xs, targets):
        r = ops.exp(-ops.clip(p["decay"], 0.0, 15.0))  # (H,)
        zeros = ops.zeros((batch, hidden), np.float32)

        def tick(carry, x):
            h, alpha, beta = carry
            h = ops.tanh(ops.matmul(x, p["wx"]) + h @ p["wh"] + p["b"])  # (B, H)
            alpha = r * alpha + h
            beta = r * beta + 1.0
            return (h, alpha, beta), (alpha * ops.rsqrt(beta)) @ p["wout"]  # (B, C)

        _, logits = mg.scan(tick, (zeros, zeros, zeros), xs)  # (T, B, C)
        onehot = ops.one_hot(targets, classes, dtype=np.float32)
        return -ops.mean(ops.sum(ops.log_softmax(logits) * onehot, axis=-1))

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    step = mg.compile(mg.value_and_grad(loss_fn), device="cpu")
    start, start_cpu = time.perf_counter(), cpu_seconds()
    step(params, xs, targets)
    first = time.perf_counter() - start
    first_cpu = cpu_seconds() - start_cpu
    start = time.perf_counter()
    step(params, xs, targets)
    run = time.perf_counter() - start
    return {
        "first_call_s": round(first, 3),
        "run_s": round(run, 4),
        "compile_s": round(first - run, 3),
        "first_call_cpu_s": round(first_cpu, 2),
        "graphs_compiled": engine_compile.STATS["compiles"],
        "mef_loads": engine_compile.STATS["mef_loads"],
    }


def run_child(steps: int, hidden: int, batch: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--hidden", str(hidden), "--batch", str(batch)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"child for steps={steps} failed with exit code {done.returncode}:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(elapsed, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 16, 64], help="scan lengths T to compile (default 4 16 64)")
    parser.add_argument("--hidden", type=int, default=64, help="state size H (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="batch size B (default 8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.steps[0], args.hidden, args.batch)), flush=True)
        return

    emit({"bench": "machine", **machine_info()})
    for steps in args.steps:
        with tempfile.TemporaryDirectory(prefix="modgrad-bench-") as root:
            env = dict(os.environ)
            env["MODGRAD_CACHE_DIR"] = os.path.join(root, "modgrad")
            env["MODULAR_CACHE_DIR"] = os.path.join(root, "modular")
            for cache in ("cold", "warm"):
                result = run_child(steps, args.hidden, args.batch, env)
                emit({"bench": "compile_time", "program": "recurrent_value_and_grad", "steps": steps,
                      "hidden": args.hidden, "batch": args.batch, "cache": cache, **result})


if __name__ == "__main__":
    main()
