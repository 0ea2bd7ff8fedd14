"""lm_validate: train a small byte-level transformer on a text file and print its cross-entropy per step.

    python examples/lm_validate.py --data tinyshakespeare.txt --steps 800
    python examples/lm_validate.py --device cpu          # compile the train and eval steps with MAX

The script checks the engine, its gradients and AdamW on a model whose behaviour is well known.
The model is a pre-norm decoder over bytes (vocabulary 256, untied embeddings) built from the
Qwen2 layers of ``modgrad.transformer``: RMSNorm, rotary embeddings, grouped-query attention and
a SwiGLU MLP of width 4 x d_model. AdamW uses betas (0.9, 0.95), weight decay 0.1 and gradients
clipped to a global norm of 1.

Each step draws random windows from the first 90 % of the file. The held-out cross-entropy is
scored on fixed windows of the last 10 %, the split ``isis train`` uses, and compared with the
add-one-smoothed byte-bigram baseline on the same split. All losses are in nats per byte.

Files written to --out-dir: lm_validate.jsonl (one JSON object per line: "start", one "train" per
step, "eval" per held-out evaluation, "end") and lm_validate.png (the loss curves).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import modgrad as mg
from modgrad import ops
from modgrad.corpus import TINYSHAKESPEARE
from modgrad.data import VOCAB_BYTES, Corpus, CorpusError, WindowSampler, bigram_baseline, held_out_windows
from modgrad.engine.compile import DEVICES, _to_host
from modgrad.engine.pytree import tree_flatten
from modgrad.losses import cross_entropy
from modgrad.optim import AdamW, clip_by_global_norm, linear_warmup_cosine
from modgrad.train import plot_losses
from modgrad.transformer import Qwen2Config, init_params, prefill_forward

LOG_NAME = "lm_validate.jsonl"
PLOT_NAME = "lm_validate.png"
MLP_RATIO = 4
GRAD_CLIP = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a small byte-level transformer (Qwen2 layers) and report held-out cross-entropy "
        "in nats/byte against the bigram baseline.",
    )
    parser.add_argument("--data", default=str(TINYSHAKESPEARE),
                        help="UTF-8 text file; the last 10%% is held out (default: the bundled tinyshakespeare)")

    parser.add_argument("--steps", type=int, default=800, help="optimizer updates (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="windows per update (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="bytes predicted per window; each window reads seq-len + 1 bytes (default: %(default)s)")

    parser.add_argument("--d-model", type=int, default=128, help="residual stream width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4,
                        help="query heads; must divide --d-model, head width = d-model / heads (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=2,
                        help="key/value heads, each shared by a group of query heads; must divide --heads "
                        "(default: %(default)s)")

    parser.add_argument("--lr", type=float, default=3e-3,
                        help="peak AdamW learning rate, reached after --warmup steps, then cosine decay to a tenth "
                        "(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps (default: %(default)s)")

    parser.add_argument("--eval-every", type=int, default=100,
                        help="steps between held-out evaluations; also evaluated at step 0 and at the end; "
                        "0 evaluates only then (default: %(default)s)")
    parser.add_argument("--eval-windows", type=int, default=64,
                        help="held-out windows of seq-len bytes scored per evaluation (default: %(default)s)")
    parser.add_argument("--out-dir", default="lm_validate_out", help="folder for the JSON-lines log and the plot "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight init and the window sampler")
    parser.add_argument("--device", default="numpy", choices=DEVICES,
                        help="numpy: eager reference, no compile; cpu/gpu: compile the steps with MAX "
                        "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def model_config(args: argparse.Namespace) -> Qwen2Config:
    """Build the byte-level decoder's Qwen2Config; raise ValueError when the head counts do not divide."""
    if args.d_model % args.heads:
        raise ValueError(f"--heads {args.heads} does not divide --d-model {args.d_model}; pick a divisor")
    if args.heads % args.kv_heads:
        raise ValueError(f"--kv-heads {args.kv_heads} does not divide --heads {args.heads}; pick a divisor")
    if (args.d_model // args.heads) % 2:
        raise ValueError(
            f"head width --d-model / --heads = {args.d_model // args.heads} is odd, but rotary embeddings "
            "need an even width; change --d-model or --heads"
        )
    return Qwen2Config(
        vocab_size=VOCAB_BYTES,
        hidden_size=args.d_model,
        intermediate_size=MLP_RATIO * args.d_model,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.d_model // args.heads,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=args.seq_len,
    )


def check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch", "seq_len", "d_model", "layers", "heads", "kv_heads", "eval_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "eval_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")


# --------------------------------------------------------------------------------------------
# Steps


def window_cross_entropy(params, tokens, positions, cfg: Qwen2Config):
    """Compute the mean next-byte cross-entropy (nats/byte) of each window. tokens (B, L+1), positions (L,) -> (B,)."""
    logits, _, _ = prefill_forward(params, tokens[:, :-1], positions, positions, cfg)  # (B, L, 256)
    return ops.mean(cross_entropy(logits, tokens[:, 1:]), -1)


def make_steps(cfg: Qwen2Config, opt: AdamW, device: str):
    """Return the compiled train step and eval step.

    train(params, opt_state, tokens (B, L+1), positions (L,), lr) -> (loss, params, opt_state)
    evaluate(params, tokens (B, L+1), positions (L,)) -> cross-entropy per window (B,)
    """

    def loss_fn(params, tokens, positions):
        return ops.mean(window_cross_entropy(params, tokens, positions, cfg))

    def train_step(params, opt_state, tokens, positions, lr):
        loss, grads = mg.value_and_grad(loss_fn)(params, tokens, positions)
        grads, _ = clip_by_global_norm(grads, GRAD_CLIP)
        params, opt_state = opt.update(params, grads, opt_state, lr=lr)
        return loss, params, opt_state

    def evaluate(params, tokens, positions):
        return window_cross_entropy(params, tokens, positions, cfg)

    return (mg.compile(train_step, device=device, name="lm_validate_train"),
            mg.compile(evaluate, device=device, name="lm_validate_eval"))


def held_out_loss(evaluate, params, windows: np.ndarray, positions: np.ndarray, batch: int) -> float:
    """Score ``windows`` (N, L+1) ``batch`` at a time; return their mean cross-entropy in nats/byte."""
    losses = []
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        n = len(chunk)
        if n < batch:  # pad to the compiled batch size; the padding is not scored
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - n, 0)])
        losses.append(np.asarray(_to_host(evaluate(params, chunk, positions)))[:n])
    return float(np.mean(np.concatenate(losses)))


# --------------------------------------------------------------------------------------------
# The run


class JsonLog:
    """Append one JSON object per line to ``path``, flushed after every line so a killed run keeps its log."""

    def __init__(self, path: Path):
        self.file = open(path, "w")

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def main(argv: list[str] | None = None) -> dict:
    """Run the training described by ``argv``; return the summary that the "end" log line also contains."""
    from tqdm import tqdm

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        cfg = model_config(args)
        corpus = Corpus.load(args.data, args.seq_len)
    except (ValueError, CorpusError) as err:
        parser.error(str(err))

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = init_params(cfg, seed=args.seed)
    n_params = sum(leaf.size for leaf in tree_flatten(params)[0])
    opt = AdamW(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    opt_state = opt.init(params)
    train_step, evaluate = make_steps(cfg, opt, args.device)
    sampler = WindowSampler(corpus.train, args.batch, args.seq_len, seed=args.seed)
    windows = held_out_windows(corpus.held_out, args.seq_len, args.eval_windows)
    positions = np.arange(args.seq_len, dtype=np.int64)
    bigram = bigram_baseline(corpus.train, corpus.held_out)
    warmup = min(args.warmup, args.steps)

    print(f"{n_params:,} parameters: {args.layers} layers, d_model {args.d_model}, {args.heads} heads "
          f"({args.kv_heads} kv), seq_len {args.seq_len}, batch {args.batch}, device {args.device}")
    print(f"data {args.data}: {len(corpus.train):,} train / {len(corpus.held_out):,} held-out bytes; "
          f"bigram baseline {bigram:.4f} nats/byte on the held-out split")

    log = JsonLog(out_dir / LOG_NAME)
    log.write(event="start", config=vars(args), parameters=n_params, bigram=bigram,
              train_bytes=len(corpus.train), held_out_bytes=len(corpus.held_out))
    history: dict[str, list] = {"train": [], "held_out": []}
    bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True, disable=args.no_progress)
    started = time.perf_counter()

    def record_held_out(step: int) -> None:
        value = held_out_loss(evaluate, params, windows, positions, args.batch)
        history["held_out"].append([step, value])
        log.write(event="eval", step=step, held_out=value, seconds=time.perf_counter() - started)
        previous = history["held_out"][-2][0] if len(history["held_out"]) > 1 else 0
        recent = [loss for train_step_index, loss in history["train"] if train_step_index > previous]
        train_part = f"train {np.mean(recent):.4f}  " if recent else ""  # mean since the previous evaluation
        bar.write(f"step {step:6d}  {train_part}held-out {value:.4f} nats/byte  (bigram {bigram:.4f})")

    try:
        record_held_out(0)
        for step in range(args.steps):
            lr = np.float32(linear_warmup_cosine(step, args.lr, warmup, args.steps, min_lr=args.lr / 10))
            tick = time.perf_counter()
            loss, params, opt_state = train_step(params, opt_state, sampler.sample(), positions, lr)
            loss = float(np.asarray(_to_host(loss)))
            elapsed = time.perf_counter() - tick
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step + 1}; lower --lr (now {args.lr})")
            history["train"].append([step + 1, loss])
            log.write(event="train", step=step + 1, loss=loss, lr=float(lr), seconds=elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", bytes_s=f"{args.batch * args.seq_len / elapsed:.0f}")
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                record_held_out(step + 1)
        record_held_out(args.steps)
        start_loss, final_loss = history["held_out"][0][1], history["held_out"][-1][1]
        summary = {
            "steps": args.steps,
            "held_out_start": start_loss,
            "held_out_final": final_loss,
            "drop": start_loss - final_loss,
            "bigram": bigram,
            "wall_seconds": time.perf_counter() - started,
        }
        log.write(event="end", **summary)
    finally:
        bar.close()
        log.close()
        plot_losses(history, bigram, out_dir / PLOT_NAME,
                    title=f"{args.layers}x{args.d_model} byte transformer on {Path(args.data).name}")

    print(f"held-out cross-entropy {start_loss:.4f} -> {final_loss:.4f} nats/byte (drop {start_loss - final_loss:.4f}, "
          f"{final_loss / math.log(2):.3f} bits/byte) after {args.steps} steps in {summary['wall_seconds']:.0f} s; "
          f"bigram baseline {bigram:.4f}")
    print(f"wrote {out_dir / LOG_NAME} and {out_dir / PLOT_NAME}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
