"""Loop gradients on the numpy device: saved residuals against recomputation.

Times maze training steps (``train_mazes``, batch 8, 21 x 21 mazes) of the single maze CTM and
of the eight_region_small brain (reference protocol). Each model runs twice: with the default
loop VJP, which saves each step's intermediates, and with every loop VJP recomputing its forward
step (what ``mg.scan(..., remat=True)`` does). Prints one JSON line per run: median and fastest seconds per
step over the steps after the first two, and the last training loss, which should agree.

    python bench/loop_gradients.py                       # 25 CTM steps and 7 brain steps per variant
    python bench/loop_gradients.py --ctm-steps 5 --brain-steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read once, when numpy loads

from common import add_repo_to_path, emit, machine_info  # noqa: E402

add_repo_to_path()


@contextlib.contextmanager
def recompute_all_loops(enabled: bool):
    """Make every loop VJP traced inside the block recompute its forward step when ``enabled``."""
    from modgrad.engine.prims import control

    saved_vjp = control._scan_vjp_saved
    if enabled:
        control._scan_vjp_saved = lambda node, cts: None  # the VJP then falls back to recomputation
    try:
        yield
    finally:
        control._scan_vjp_saved = saved_vjp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctm-steps", type=int, default=25, help="training steps per variant for the single CTM")
    ap.add_argument("--brain-steps", type=int, default=7, help="training steps per variant for the brain")
    args = ap.parse_args(argv)
    for name, steps in (("ctm", args.ctm_steps), ("brain", args.brain_steps)):
        if steps < 3:
            ap.error(f"--{name}-steps must be at least 3 (the first two steps are not timed), got {steps}")

    from modgrad.mazes.train import MazeTrainConfig, train_mazes

    machine = machine_info()
    for model, steps in (("ctm", args.ctm_steps), ("brain", args.brain_steps)):
        for variant in ("saved", "recompute"):
            with recompute_all_loops(variant == "recompute"):
                run = train_mazes(MazeTrainConfig(model=model, steps=steps, heldout=8), progress=False)
            times = sorted(row[4] for row in run.history["train"][2:])
            emit({
                "bench": "loop_gradients",
                "model": model,
                "variant": variant,
                "steps": steps,
                "median_s_per_step": round(times[len(times) // 2], 4),
                "min_s_per_step": round(times[0], 4),
                "last_loss": run.history["train"][-1][1],
                "machine": machine,
            })


if __name__ == "__main__":
    main()
