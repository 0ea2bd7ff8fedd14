"""mazes: train a single CTM or an eight-region brain to predict the first 20 moves of maze routes.

    python examples/mazes.py --size 21 --steps 5000 --seed 42            # single CTM, 450,325 parameters
    python examples/mazes.py --brain --size 21 --steps 5000 --seed 42    # eight_region_small, 187,881
    python examples/mazes.py --brain --protocol fair --steps 300         # brain attends over all 121 tokens
    python examples/mazes.py --brain --gradients truncated               # the reference's gradient cut
    python examples/mazes.py --baselines                                  # scores of rules that read nothing

Progress goes to stderr (tqdm: loss, training accuracy, steps/s). The last line on stdout is one
JSON object with the three held-out metrics: first_step, per_step (fractions) and correct_prefix
(mean leading correct moves of 20) on the 200 mazes of MazeRng(seed + 999).
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description="Train a CTM or a brain on maze routes and score it on held-out mazes.")
parser.add_argument("--brain", action="store_true", help="train eight_region_small instead of the single CTM")
parser.add_argument("--protocol", default="reference", choices=("reference", "fair"),
                    help="reference: the reference benchmark's inputs and optimisers; fair: the brain attends over "
                         "all tokens and both models use AdamW with global-norm clipping")
parser.add_argument("--gradients", default="exact", choices=("exact", "truncated"),
                    help="exact: backpropagation through every tick; truncated (brain only): no gradient crosses an "
                         "outer tick, as in the reference's hand-written backward pass")
parser.add_argument("--size", type=int, default=21, help="maze side in cells (odd)")
parser.add_argument("--steps", type=int, default=5000, help="optimiser steps")
parser.add_argument("--seed", type=int, default=42, help="training maze stream; held-out mazes use seed + 999")
parser.add_argument("--batch", type=int, default=8, help="mazes per step")
parser.add_argument("--lr", type=float, default=3e-4, help="learning rate")
parser.add_argument("--ticks", type=int, default=16, help="CTM ticks, or the brain's outer ticks and region ticks")
parser.add_argument("--d-model", type=int, default=256, help="single-CTM neurons")
parser.add_argument("--route-len", type=int, default=20, help="moves predicted per maze")
parser.add_argument("--clip", type=float, default=None,
                    help="gradient-norm limit (default 5 on the batch-summed gradient for reference, 1 on the mean for fair)")
parser.add_argument("--heldout", type=int, default=200, help="held-out mazes scored")
parser.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: at the end only)")
parser.add_argument("--budget", type=float, default=0.0,
                    help="stop training after this many seconds and score the model reached (0: no limit)")
parser.add_argument("--device", default="numpy", choices=("numpy", "cpu", "gpu"),
                    help="numpy runs eagerly with no compile; cpu/gpu compile the train step with MAX first")
parser.add_argument("--blas-threads", type=int, default=1,
                    help="OpenBLAS threads for the numpy device (small matmuls run faster on one thread)")
parser.add_argument("--render", metavar="PNG", help="draw six held-out mazes with true and predicted routes")
parser.add_argument("--history", metavar="JSON", help="write the per-step loss and every evaluation to this file")
parser.add_argument("--checkpoint", metavar="SAFETENSORS", default="",
                    help="save weights, optimiser state and progress here at every evaluation and at the end; "
                         "if the file exists, continue that run (same settings; --steps, --budget may differ)")
parser.add_argument("--baselines", action="store_true", help="print the scores of trivial rules and exit")
parser.add_argument("--plot", nargs="+", metavar=("PNG", "HISTORY"),
                    help="plot the --history files of finished runs into PNG (with the trivial baselines) and exit")
parser.add_argument("--quiet", action="store_true", help="no progress bar")
args = parser.parse_args()

# OpenBLAS reads this once, when numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.blas_threads))

from modgrad.mazes.train import (  # noqa: E402
    MazeTrainConfig,
    plot_curves,
    render_predictions,
    save_history,
    train_mazes,
    trivial_baselines,
)

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

if args.plot:
    if len(args.plot) < 2:
        parser.error("--plot needs an output PNG and at least one history JSON")
    baselines = trivial_baselines(args.size, args.seed, args.heldout, args.route_len)
    shown = {name: baselines[name] for name in ("always_down", "open_neighbour")}
    print(f"wrote {plot_curves(args.plot[0], args.plot[1:], shown)}", file=sys.stderr)
    sys.exit(0)

if args.baselines:
    for name, scores in trivial_baselines(args.size, args.seed, args.heldout, args.route_len).items():
        print(json.dumps({"baseline": name, "size": args.size, "seed": args.seed, **scores}))
    sys.exit(0)

if args.checkpoint and args.history:
    from modgrad.checkpoint import checkpoint_paths

    if Path(args.history).resolve() in {path.resolve() for path in checkpoint_paths(args.checkpoint).values()}:
        parser.error(f"--history {args.history} is one of the files of --checkpoint {args.checkpoint}; "
                     "give the history another name")

try:
    cfg = MazeTrainConfig(
        model="brain" if args.brain else "ctm",
        protocol=args.protocol,
        size=args.size,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        ticks=args.ticks,
        d_model=args.d_model,
        route_len=args.route_len,
        clip=args.clip,
        heldout=args.heldout,
        eval_every=args.eval_every,
        budget_s=args.budget,
        device=args.device,
        checkpoint=args.checkpoint,
        gradients=args.gradients,
    )
except ValueError as error:
    parser.error(str(error))
run = train_mazes(cfg, progress=not args.quiet)

if args.history:
    save_history(args.history, run)
if args.render:
    from modgrad.mazes import MazeDataset, VisualEncoder

    encoder = VisualEncoder.brain(cfg.size | 1) if args.brain else VisualEncoder.single_ctm(cfg.size | 1)
    heldout = MazeDataset(cfg.size, cfg.seed, cfg.batch, cfg.route_len, encoder=encoder).heldout(cfg.heldout)
    title = f"{cfg.model} ({cfg.protocol}), {cfg.steps} steps, seed {cfg.seed}"
    print(f"wrote {render_predictions(args.render, heldout, run.heldout_moves, title=title)}", file=sys.stderr)
print(json.dumps(run.summary()))
