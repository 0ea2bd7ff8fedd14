"""CTM training-step speed: our compiled step vs the same CTM in PyTorch eager, in one run.

Prints one JSON line per measurement: {"bench", "impl", "ms_per_step", ...}. The default config is
Sakana's maze CTM: d_model 512, d_input 128, 8 heads, synapse depth 8, memory 25, NLM hidden 32,
32/32 sync pairs, 75 ticks, batch 16, 100 observation tokens. Both sides run forward, backward
(autograd / our VJPs) and an AdamW update on the same weights, with the mean cross-entropy over
ticks as the loss. A last line, "arithmetic", gives the floating-point work of one step (torch's
count of its matmul FLOPs, forward and backward), the rate each side reached and numpy's float32
matmul rate on this machine.

    python bench/ctm_train.py                    # the maze config (compiles for minutes on a cold cache)
    python bench/ctm_train.py --ticks 8 --d-model 64 --steps 3   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-input", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--synapse-depth", type=int, default=8)
    ap.add_argument("--memory-length", type=int, default=25)
    ap.add_argument("--nlm-hidden", type=int, default=32)
    ap.add_argument("--n-synch", type=int, default=32, help="sync pairs for both output and action")
    ap.add_argument("--ticks", type=int, default=75)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=100, help="observation tokens per example")
    ap.add_argument("--out-dims", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation (after one warm-up)")
    ap.add_argument("--device", default="cpu", help="cpu, gpu or numpy for our side")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()

    import torch

    import modgrad as mg
    from modgrad import ops
    from modgrad.ctm import CtmConfig, init_ctm
    from modgrad.ctm.model import ctm_forward
    from modgrad.optim import AdamW
    from modgrad.testing import torch_ctm

    cfg = CtmConfig(
        ticks=args.ticks, d_model=args.d_model, d_input=args.d_input, heads=args.heads,
        n_synch_out=args.n_synch, n_synch_action=args.n_synch, synapse_depth=args.synapse_depth,
        memory_length=args.memory_length, deep_nlms=True, memory_hidden_dims=args.nlm_hidden,
        out_dims=args.out_dims, min_width=16,
    )
    params, buffers = init_ctm(cfg, raw_input_dim=args.d_input)
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((args.batch, args.tokens, args.d_input)).astype(np.float32)
    targets = rng.integers(0, args.out_dims, args.batch)
    common = {"d_model": cfg.d_model, "ticks": cfg.ticks, "batch": args.batch, "tokens": args.tokens,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch_threads": torch.get_num_threads()}

    def loss_fn(p, x, y):
        preds, _, _ = ctm_forward(p, buffers, cfg, x)  # (B, T, O)
        logp = ops.log_softmax(preds, -1)
        return -ops.mean(ops.sum(logp * ops.expand_dims(ops.one_hot(y, cfg.out_dims), 1), -1))

    opt = AdamW(lr=1e-4, weight_decay=0.0)  # as the torch peer below

    def train_step(p, s, x, y):
        loss, grads = mg.value_and_grad(loss_fn)(p, x, y)
        p, s = opt.update(p, grads, s)
        return loss, p, s

    step = mg.compile(train_step, device=args.device)
    state = opt.init(params)
    t0 = time.perf_counter()
    loss, p, s = step(params, state, obs, targets)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, p, s = step(p, s, obs, targets)
        times.append(time.perf_counter() - t0)
    ours = 1e3 * float(np.median(times))
    print(json.dumps({"bench": "ctm_train", "impl": f"modgrad-{args.device}", "ms_per_step": round(ours, 2),
                      "first_call_s": round(first, 1), "loss": float(loss), **common}), flush=True)

    if args.skip_torch:
        return
    tp = torch_ctm.to_torch(params)
    topt = torch.optim.AdamW(torch_ctm.leaves(tp), lr=1e-4, weight_decay=0.0)
    tx, ty = torch.tensor(obs), torch.tensor(targets)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        preds = torch_ctm.ctm_forward(tp, buffers, cfg, tx)
        loss = torch.nn.functional.cross_entropy(preds.reshape(-1, cfg.out_dims), ty.repeat_interleave(cfg.ticks))
        loss.backward()
        topt.step()
        return loss

    torch_step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        torch_step()
        times.append(time.perf_counter() - t0)
    theirs = 1e3 * float(np.median(times))
    print(json.dumps({"bench": "ctm_train", "impl": "torch-eager", "ms_per_step": round(theirs, 2), **common}), flush=True)
    print(json.dumps({"bench": "ctm_train", "impl": "speedup", "torch_over_ours": round(theirs / ours, 3), **common}), flush=True)

    # The arithmetic of one step (torch's count of its matmuls, forward and backward) against the
    # machine's float32 matmul rate shows how far any implementation could go.
    from torch.utils.flop_counter import FlopCounterMode

    from common import matmul_gflop_s

    counter = FlopCounterMode(display=False)
    with counter:
        torch_step()
    flops = counter.get_total_flops()
    peak = matmul_gflop_s()
    print(json.dumps({"bench": "ctm_train", "impl": "arithmetic", "gflop_per_step": round(flops / 1e9, 2),
                      "matmul_peak_gflop_s": round(peak, 1),
                      "gflop_s": {"modgrad": round(flops / ours / 1e6, 1), "torch": round(flops / theirs / 1e6, 1)},
                      "floor_ms_at_peak": round(flops / peak / 1e6, 1), **common}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
