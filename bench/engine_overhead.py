"""Per-call overhead of compiled programs, and latency of a small MLP's loss and gradient.

Implementations, one JSON line each:
  modgrad-cpu     mg.compile(..., device="cpu"): MAX graphs, inputs and outputs as numpy arrays
  max-execute     (trivial only) the compiled MAX model called directly, without the engine's
                  argument flattening and result conversion
  modgrad-numpy   mg.compile(..., device="numpy"): the recorded program run by the numpy evaluator
  modgrad-eager   the same function called on numpy arrays (traces and backpropagates every call)
  numpy           hand-written numpy forward and backward
  torch           torch eager with autograd (CPU)

Benchmarks:
  trivial             y = x + 1 on a (1,) float32 array: the fixed cost of one call
  mlp_value_and_grad  loss and gradients of a 2-layer tanh MLP with softmax cross-entropy,
                      sizes D -> H -> C (default 128 -> 256 -> 10), at each --batch size

Fields: median_us and min_us are microseconds per call over `calls` calls, after one warm-up
call. first_call_s is the wall time of the first call, which includes tracing and compiling
(or loading the compiled graphs from the MODGRAD_CACHE_DIR disk cache).

    python bench/engine_overhead.py
    python bench/engine_overhead.py --batch 1 64 256 --seconds 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import add_repo_to_path, emit, machine_info, time_per_call

add_repo_to_path()

import modgrad as mg  # noqa: E402
from modgrad import ops  # noqa: E402

try:
    import torch
except ImportError:  # torch is optional; its lines are left out
    torch = None


def mlp_loss(p, x, labels):
    h = ops.tanh(ops.matmul(x, p["w1"]) + p["b1"])  # (B, H)
    logits = h @ p["w2"] + p["b2"]  # (B, C)
    onehot = ops.one_hot(labels, ops.shape_of(p["b2"])[0], dtype=ops.dtype_of(logits))
    return -ops.mean(ops.sum(ops.log_softmax(logits) * onehot, axis=-1))


def numpy_mlp(p, x, labels):
    """Hand-written forward and backward of ``mlp_loss``."""
    h = np.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    probs = e / e.sum(axis=-1, keepdims=True)
    batch = x.shape[0]
    rows = np.arange(batch)
    loss = -np.mean(shifted[rows, labels] - np.log(e.sum(axis=-1)))
    dlogits = probs
    dlogits[rows, labels] -= 1.0
    dlogits /= batch
    dh = (dlogits @ p["w2"].T) * (1.0 - h * h)
    grads = {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ dlogits, "b2": dlogits.sum(0)}
    return loss, grads


def torch_mlp(p, x, labels):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    loss = torch.nn.functional.cross_entropy(h @ p["w2"] + p["b2"], labels)
    grads = torch.autograd.grad(loss, list(p.values()))
    return loss.detach(), dict(zip(p, grads))


def timed_first_call(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_trivial(seconds: float) -> None:
    x = np.ones(1, np.float32)
    cases = {
        "modgrad-cpu": mg.compile(lambda v: v + 1.0, device="cpu"),
        "modgrad-numpy": mg.compile(lambda v: v + 1.0, device="numpy"),
        "modgrad-eager": lambda v: ops.add(v, 1.0),
        "numpy": lambda v: v + 1.0,
    }
    if torch is not None:
        xt = torch.ones(1)
        cases["torch"] = lambda _: xt + 1.0
    for impl, fn in cases.items():
        out, first = timed_first_call(lambda: fn(x))
        assert float(np.asarray(out)[0]) == 2.0, f"{impl} computed {out}"
        emit({"bench": "trivial", "impl": impl, "first_call_s": round(first, 3),
              **time_per_call(lambda: fn(x), seconds)})

    # The single compiled graph of modgrad-cpu, called the way MAX's own API is used.
    plan = next(iter(cases["modgrad-cpu"]._plans.values()))[0]
    model = plan.steps[0].model
    out = model.execute(x)[0].to_numpy()
    assert float(out[0]) == 2.0, f"max-execute computed {out}"
    emit({"bench": "trivial", "impl": "max-execute", "first_call_s": 0.0,
          **time_per_call(lambda: model.execute(x)[0].to_numpy(), seconds)})


def bench_mlp(batches: list[int], sizes: tuple[int, int, int], seconds: float) -> None:
    d, h, c = sizes
    rng = np.random.default_rng(0)
    params = {
        "w1": (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32),
        "b1": np.zeros(h, np.float32),
        "w2": (rng.standard_normal((h, c)) / np.sqrt(h)).astype(np.float32),
        "b2": np.zeros(c, np.float32),
    }
    dims = (None, ("B", d), ("B",))
    value_and_grad = mg.value_and_grad(mlp_loss)
    compiled_cpu = mg.compile(value_and_grad, device="cpu", dims=dims)
    compiled_numpy = mg.compile(value_and_grad, device="numpy", dims=dims)

    for batch in batches:
        x = rng.standard_normal((batch, d)).astype(np.float32)
        labels = rng.integers(0, c, batch)
        cases = {
            "modgrad-cpu": lambda: compiled_cpu(params, x, labels),
            "modgrad-numpy": lambda: compiled_numpy(params, x, labels),
            "modgrad-eager": lambda: value_and_grad(params, x, labels),
            "numpy": lambda: numpy_mlp(params, x, labels),
        }
        if torch is not None:
            pt = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
            xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
            cases["torch"] = lambda: torch_mlp(pt, xt, lt)

        ref_loss, ref_grads = numpy_mlp(params, x, labels)
        for impl, fn in cases.items():
            (loss, grads), first = timed_first_call(fn)
            # Every implementation must compute the same thing before its time means anything.
            np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, err_msg=impl)
            for name in params:
                np.testing.assert_allclose(np.asarray(grads[name]), ref_grads[name], rtol=1e-3, atol=1e-5,
                                           err_msg=f"{impl}: gradient of {name}")
            emit({"bench": "mlp_value_and_grad", "impl": impl, "batch": batch, "sizes": [d, h, c],
                  "first_call_s": round(first, 3), **time_per_call(fn, seconds)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="MLP batch sizes (default 1 64)")
    parser.add_argument("--sizes", type=int, nargs=3, default=[128, 256, 10], metavar=("D", "H", "C"),
                        help="MLP input, hidden and class sizes (default 128 256 10)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per measurement (default 0.5)")
    args = parser.parse_args()

    emit({"bench": "machine", **machine_info()})
    bench_trivial(args.seconds)
    bench_mlp(args.batch, tuple(args.sizes), args.seconds)


if __name__ == "__main__":
    main()
