"""Gradient norms of the maze models at initialisation, and the learning rate the reference rule leaves.

The reference optimisers scale the learning rate by min(1, clip / n), where n is the L2 norm of a
subset of the batch-summed gradient (clip 5). This script takes the gradient of the batch-summed
step-wise loss at the initial weights on a few training batches. It prints one JSON line per
(model, protocol, gradients) setting: the median, minimum and maximum of n over the batches. The
line also gives the learning rate the reference rule uses at the median n. For the brain that
is 3e-4 * min(1, 5 / n), for the single CTM 3e-4 / 8 * min(1, 5 / n). The fair protocol clips the gradient itself, so its learning
rate does not depend on n.

    python bench/maze_grad_norms.py                  # brain, both protocols, exact and truncated
    python bench/maze_grad_norms.py --batches 8 --model ctm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def reference_lr(cfg, norm: float) -> float:
    """Learning rate of the reference rule for a clip-subset gradient norm ``norm``."""
    lr = cfg.lr / cfg.batch if cfg.model == "ctm" else cfg.lr
    return lr * min(1.0, cfg.grad_clip / norm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="brain", choices=("brain", "ctm"))
    ap.add_argument("--batches", type=int, default=5, help="training batches of 8 mazes to take gradients on")
    ap.add_argument("--size", type=int, default=21, help="maze side in cells")
    ap.add_argument("--seed", type=int, default=42, help="training maze stream")
    args = ap.parse_args()
    if args.batches < 1:
        ap.error(f"--batches must be at least 1, got {args.batches}")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    import modgrad as mg
    from modgrad import ops
    from modgrad.engine.pytree import tree_flatten
    from modgrad.losses import StepwiseCE
    from modgrad.mazes.encode import MazeDataset
    from modgrad.mazes.train import (BRAIN_CLIP_NORM, CTM_CLIP_NORM, MazeTrainConfig, _matches, build_model)
    from modgrad.optim import tree_paths

    settings = [("reference", "exact"), ("fair", "exact")]
    if args.model == "brain":
        settings.insert(1, ("reference", "truncated"))
    subset = BRAIN_CLIP_NORM if args.model == "brain" else CTM_CLIP_NORM
    loss_fn = StepwiseCE(n_classes=5, lookahead=5)
    for protocol, gradients in settings:
        cfg = MazeTrainConfig(model=args.model, protocol=protocol, gradients=gradients, size=args.size, seed=args.seed)
        model = build_model(cfg)
        data = MazeDataset(cfg.size, cfg.seed, cfg.batch, cfg.route_len, encoder=model.encoder)
        norms = []
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = data.next_batch()

            def summed(params):
                preds, cert = model.forward(params, model.buffers, batch.tokens)
                return ops.sum(loss_fn.per_example(preds, batch.targets, cert))

            grads = mg.grad(summed)(model.params)
            counted = [np.asarray(g, np.float64) for path, g in zip(tree_paths(grads), tree_flatten(grads)[0])
                       if _matches(path, subset)]
            norms.append(float(np.sqrt(sum(np.sum(g * g) for g in counted))))
        median = float(np.median(norms))
        print(json.dumps({
            "bench": "maze_grad_norms", "model": args.model, "protocol": protocol, "gradients": gradients,
            "batches": args.batches, "norm_median": median, "norm_min": min(norms), "norm_max": max(norms),
            "lr_at_median": reference_lr(cfg, median) if protocol == "reference" else None, "seconds": time.perf_counter() - start,
            "machine": platform.processor() or platform.machine(),
        }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
