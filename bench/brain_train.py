"""Brain training throughput: tokens per second of a full train step at several batch sizes.

A train step is the text training step of ``isis train``: a window of byte tokens per example,
exact backpropagation through the whole window, global-norm clipping and AdamW. Tokens per second
counts predicted bytes (batch x seq_len) per wall second, median of the timed steps after one
warm-up step. The loss is the last outer tick's cross-entropy (``--loss last`` of isis train). One
compiled program serves every batch size (the batch axis is symbolic), so the cold compile is
paid once per device.

    python bench/brain_train.py                              # eight_region_small, batch 1 and 32, cpu
    python bench/brain_train.py --device numpy --steps 2     # the eager numpy reference
    python bench/brain_train.py --embed-dim 128 --ticks 16   # the reference's quick-start shape
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common import add_repo_to_path, emit, machine_info

add_repo_to_path()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="eight_region_small", help="brain preset or single_ctm")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (windows per step)")
    ap.add_argument("--seq-len", type=int, default=32, help="predicted bytes per window")
    ap.add_argument("--embed-dim", type=int, default=32, help="byte embedding width (the observation width)")
    ap.add_argument("--ticks", type=int, default=2, help="outer ticks per byte and region ticks per outer tick")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per batch size, after one warm-up step")
    ap.add_argument("--device", default="cpu", help="cpu or gpu (compiled with MAX), or numpy (eager, no compile)")
    args = ap.parse_args(argv)

    import modgrad as mg
    from modgrad import ops
    from modgrad.engine.compile import STATS
    from modgrad.graph import init_brain
    from modgrad.losses import cross_entropy
    from modgrad.optim import AdamW, clip_by_global_norm
    from modgrad.train import build_brain, window_logits

    brain = build_brain(args.preset, args.embed_dim, args.ticks)
    params, buffers = init_brain(brain, seed=0)
    opt = AdamW(lr=1e-3, weight_decay=0.01)

    def window_loss(p, tokens):
        logits, targets = window_logits(p, buffers, brain, tokens)  # (B, L, K, 256), (B, L)
        return ops.mean(cross_entropy(logits[:, :, -1], targets))

    def train_step(p, s, tokens):
        loss, grads = mg.value_and_grad(window_loss)(p, tokens)
        grads, _ = clip_by_global_norm(grads, 1.0)
        p, s = opt.update(p, grads, s)
        return loss, p, s

    step = mg.compile(train_step, device=args.device, dims=(None, None, ("B", args.seq_len + 1)), name="bench_brain")
    rng = np.random.default_rng(0)
    common = {"preset": args.preset, "embed_dim": args.embed_dim, "ticks": args.ticks, "seq_len": args.seq_len,
              "device": args.device, "machine": machine_info()}
    for batch in args.batches:
        tokens = rng.integers(0, 256, (batch, args.seq_len + 1))
        p, s = params, opt.init(params)
        compiles = STATS["compiles"]
        start = time.perf_counter()
        loss, p, s = step(p, s, tokens)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loss, p, s = step(p, s, tokens)
            float(np.asarray(loss))  # copying the loss to the host waits for the step to finish
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        emit({"bench": "brain_train", "batch": batch, "ms_per_step": round(1e3 * seconds, 1),
              "tokens_per_s": round(batch * args.seq_len / seconds, 1), "first_call_s": round(first, 1),
              "graphs_compiled": STATS["compiles"] - compiles, "loss": float(np.asarray(loss)), **common})


if __name__ == "__main__":
    sys.exit(main())
