"""Train a brain (or a single CTM) as a byte-level language model.

Each step draws B random windows of L + 1 bytes and runs the brain over the first L bytes,
carrying its state from byte to byte (``brain_forward_tokens``). The per-tick loss of predicting
each next byte is backpropagated through the whole window, every outer tick and every region tick.
The step (forward, gradient, clipping, AdamW) is one function compiled once with ``mg.compile``.
The learning rate is one of its inputs, so the warmup-cosine schedule never triggers a recompile.

Held-out loss is the last outer tick's cross-entropy in nats/byte, the prediction that
generation samples from, on fixed windows of the held-out tail of the corpus.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import modgrad as mg
from modgrad import ops
from modgrad.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore_opt_state,
    restore_weights,
    save_checkpoint,
)
from modgrad.ctm.config import CtmConfig, ExitStrategy
from modgrad.engine.compile import DEVICES, _to_host
from modgrad.engine.pytree import tree_map
from modgrad.files import atomic_write
from modgrad.data import Corpus, VOCAB_BYTES, WindowSampler, bigram_baseline, held_out_windows
from modgrad.graph import PRESETS as BRAIN_PRESETS
from modgrad.graph import RegionalConfig, brain_forward_tokens, init_brain
from modgrad.graph import preset as brain_preset
from modgrad.losses import LOSSES, cross_entropy, make_loss
from modgrad.optim import AdamW, clip_by_global_norm, linear_warmup_cosine

log = logging.getLogger(__name__)

SINGLE_CTM = "single_ctm"
PRESET_NAMES = (*BRAIN_PRESETS, SINGLE_CTM)


class TrainError(ValueError):
    """Invalid training settings, or a run that cannot continue (for example a loss that became NaN)."""


# --------------------------------------------------------------------------------------------
# Models


def single_ctm(obs_dim: int, out_dims: int, ticks: int) -> RegionalConfig:
    """Build one CTM region (D 64, Di 32, M 16, deep NLMs) as a one-region brain.

    The brain's outer loop runs ``ticks`` times with one region tick each, so every CTM tick makes
    a prediction, read from a synchronisation of the region's neurons (128 pairs) by output_proj.
    """
    region = CtmConfig.region("ctm", 64, 32, 16, True, 1, ExitStrategy.none())
    return RegionalConfig(
        regions=(region,),
        region_names=("ctm",),
        connections=(),
        outer_ticks=ticks,
        n_global_sync=128,
        out_dims=out_dims,
        raw_obs_dim=obs_dim,
        exit_strategy=ExitStrategy.none(),
        extra_heads=False,
        name=SINGLE_CTM,
    )


def build_brain(preset: str, embed_dim: int, ticks: int, vocab: int = VOCAB_BYTES) -> RegionalConfig:
    """Build the RegionalConfig of a preset for byte modelling.

    The reference's seven extra output heads are left out because nothing reads them.
    """
    if preset not in PRESET_NAMES:
        raise TrainError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
    if embed_dim < 1 or ticks < 1:
        raise TrainError(f"embed dim and ticks must be >= 1, got embed={embed_dim}, ticks={ticks}")
    if preset == SINGLE_CTM:
        return single_ctm(embed_dim, vocab, ticks)
    return brain_preset(preset, embed_dim, vocab, ticks).replace(extra_heads=False)


def window_logits(params: dict, buffers: dict, cfg: RegionalConfig, tokens):
    """Logits for every next-byte prediction of a window. tokens (B, L+1) -> (B, L, K, V), targets (B, L)."""
    logits, _ = brain_forward_tokens(params, buffers, cfg, tokens[:, :-1])
    return logits, tokens[:, 1:]


# --------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    """Settings of a text training run. Lengths are in bytes; the learning rate is per AdamW step.

    preset: brain preset name (or "single_ctm"). embed_dim: byte embedding width (the brain's
    observation width). ticks: outer ticks per byte, and each region's ticks per outer tick.
    batch: windows per step. seq_len: bytes per window that are predicted (each window is
    seq_len + 1 bytes long). lr: peak learning rate, reached after ``warmup`` steps, then cosine decay
    to lr * min_lr_ratio at ``steps``. clip: global gradient-norm limit. loss: per-tick loss
    (see modgrad.losses.LOSSES). eval_every / save_every: steps between held-out evaluations and
    between checkpoints (0 disables; both also run at the end). eval_windows: held-out windows
    scored per evaluation. device: "cpu" (MAX), "gpu" or "numpy" (eager reference, no compile).

    NOTE: device "gpu" has not been run: results stay on the accelerator between steps and are
    copied to the host only for logging and checkpoints.
    """

    data: str
    preset: str = "eight_region_small"
    steps: int = 200
    batch: int = 8
    seq_len: int = 32
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    ticks: int = 2
    embed_dim: int = 32
    loss: str = "last"
    seed: int = 0
    eval_every: int = 50
    eval_windows: int = 64
    save_every: int = 100
    device: str = "cpu"

    # Settings that may change when a run is resumed; the rest must match to resume exactly.
    RESUMABLE = ("data", "steps", "eval_every", "save_every", "eval_windows", "device")

    def validate(self) -> None:
        if self.preset not in PRESET_NAMES:
            raise TrainError(f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
        if self.loss not in LOSSES:
            raise TrainError(f"unknown loss {self.loss!r}; valid losses: {', '.join(LOSSES)}")
        positive = ("steps", "batch", "seq_len", "ticks", "embed_dim", "eval_windows")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise TrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not self.clip > 0:
            raise TrainError(f"lr and clip must be positive, got lr={self.lr}, clip={self.clip}")
        if self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"need weight_decay >= 0 and 0 <= min_lr_ratio <= 1, got {self.weight_decay}, {self.min_lr_ratio}")
        if self.device not in DEVICES:
            raise TrainError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def learning_rate(cfg: TrainConfig, step: int) -> np.float32:
    """Return the learning rate of update ``step`` (counted from 0): linear warmup, then cosine decay."""
    warmup = min(cfg.warmup, cfg.steps)
    lr = linear_warmup_cosine(step, cfg.lr, warmup, cfg.steps, min_lr=cfg.lr * cfg.min_lr_ratio)
    return np.float32(lr)


# --------------------------------------------------------------------------------------------
# Compiled programs


def make_train_step(brain: RegionalConfig, cfg: TrainConfig, opt: AdamW):
    """step(params, opt_state, buffers, tokens (B, L+1), lr) -> (loss, params, opt_state, grad_norm)."""
    loss_fn = make_loss(cfg.loss)

    def window_loss(params, buffers, tokens):
        logits, targets = window_logits(params, buffers, brain, tokens)
        batch, length, ticks, vocab = ops.shape_of(logits)
        preds = ops.reshape(logits, (batch * length, ticks, vocab))  # one example per predicted byte
        return loss_fn(preds, ops.reshape(targets, (batch * length,)))

    def train_step(params, opt_state, buffers, tokens, lr):
        loss, grads = mg.value_and_grad(window_loss)(params, buffers, tokens)
        grads, grad_norm = clip_by_global_norm(grads, cfg.clip)
        params, opt_state = opt.update(params, grads, opt_state, lr=lr)
        return loss, params, opt_state, grad_norm

    return mg.compile(train_step, device=cfg.device, name=f"train_{brain.name}")


def make_eval_step(brain: RegionalConfig, device: str):
    """evaluate(params, buffers, tokens (B, L+1)) -> last-tick cross-entropy per window (B,), nats/byte."""

    def evaluate(params, buffers, tokens):
        logits, targets = window_logits(params, buffers, brain, tokens)
        return ops.mean(cross_entropy(logits[:, :, -1], targets), -1)

    return mg.compile(evaluate, device=device, name=f"eval_{brain.name}")


def _host(tree):
    """Copy a tree of results to numpy (GPU results stay on the device until asked)."""
    return tree_map(_to_host, tree)


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Runs, checkpoints and resumes one training run; ``out`` is the checkpoint's weights path.

    ``progress`` shows a tqdm bar on stderr with the loss and throughput in bytes (tokens) per second.
    """

    def __init__(self, cfg: TrainConfig, out: str | Path, progress: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.corpus = Corpus.load(cfg.data, cfg.seq_len)
        self.brain = build_brain(cfg.preset, cfg.embed_dim, cfg.ticks)
        self.params, self.buffers = init_brain(self.brain, seed=cfg.seed)
        self.opt = AdamW(lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt_state = self.opt.init(self.params)
        self.sampler = WindowSampler(self.corpus.train, cfg.batch, cfg.seq_len, seed=cfg.seed)
        self.step = 0
        self.history: dict[str, list] = {"train": [], "held_out": []}
        self.baseline = bigram_baseline(self.corpus.train, self.corpus.held_out)
        self._eval_windows = held_out_windows(self.corpus.held_out, cfg.seq_len, cfg.eval_windows)
        self._train_step = None
        self._eval_step = None

    # ----------------------------------------------------------------------------------------
    # Resume

    @classmethod
    def resume(cls, out: str | Path, progress: bool = True, **changes) -> "Trainer":
        """Continue the run saved at ``out``; ``changes`` may set the RESUMABLE settings (e.g. steps).

        The weights, optimizer state, step and batch sampler state are restored, so the resumed run
        produces exactly the results of an uninterrupted one.
        """
        ckpt = load_checkpoint(out, with_optimizer=True)
        stored = ckpt.trainer.get("train_config")
        if not stored:
            raise CheckpointError(f"checkpoint {out} contains no training settings; it cannot be resumed")
        fixed = {k: v for k, v in changes.items() if k not in TrainConfig.RESUMABLE and stored.get(k) != v}
        if fixed:
            raise TrainError(
                f"cannot change {', '.join(sorted(fixed))} when resuming {out} "
                f"(stored: {', '.join(f'{k}={stored.get(k)!r}' for k in sorted(fixed))}); drop those settings"
            )
        cfg = TrainConfig.from_dict({**stored, **changes})
        trainer = cls(cfg, out, progress=progress)
        brain = RegionalConfig.from_dict(ckpt.config["brain"])
        if brain != trainer.brain:
            raise CheckpointError(f"checkpoint {out} was trained with a different brain config than its settings build")
        trainer.params, trainer.buffers = restore_weights(ckpt, brain)
        trainer.opt_state = restore_opt_state(ckpt.opt_state, brain)
        trainer.step = int(ckpt.trainer["step"])
        trainer.sampler.load_state_dict(ckpt.trainer["sampler"])
        trainer.history = ckpt.trainer.get("history", {"train": [], "held_out": []})
        if trainer.step > cfg.steps:
            raise TrainError(f"checkpoint {out} is at step {trainer.step}, beyond steps={cfg.steps}; pass more steps")
        return trainer

    # ----------------------------------------------------------------------------------------
    # Steps

    def train_step(self, tokens: np.ndarray) -> tuple[float, float]:
        """One optimizer update on a batch of windows (B, L+1); return (loss, gradient norm)."""
        if self._train_step is None:
            self._train_step = make_train_step(self.brain, self.cfg, self.opt)
        lr = learning_rate(self.cfg, self.step)
        loss, self.params, self.opt_state, grad_norm = self._train_step(
            self.params, self.opt_state, self.buffers, tokens, lr
        )
        loss, grad_norm = float(np.asarray(_host(loss))), float(np.asarray(_host(grad_norm)))
        if not math.isfinite(loss):
            raise TrainError(f"training loss became {loss} at step {self.step}; lower --lr (now {self.cfg.lr}) or --clip")
        self.step += 1
        return loss, grad_norm

    def evaluate(self) -> float:
        """Mean last-tick cross-entropy on the held-out windows, in nats/byte."""
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.brain, self.cfg.device)
        windows = self._eval_windows
        batch = self.cfg.batch
        losses = []
        for start in range(0, len(windows), batch):
            chunk = windows[start : start + batch]
            n = len(chunk)
            if n < batch:  # pad to the compiled batch size; the padding is not scored
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - n, 0)])
            losses.append(np.asarray(_host(self._eval_step(self.params, self.buffers, chunk)))[:n])
        return float(np.mean(np.concatenate(losses)))

    def fit(self, stop_after: int | None = None) -> dict:
        """Train up to ``cfg.steps`` (or only up to step ``stop_after``), evaluating and checkpointing on schedule.

        The checkpoint is always written at the end. On Ctrl-C it is written at the last completed
        step before KeyboardInterrupt propagates, so ``Trainer.resume`` continues the same run.
        Returns a summary: steps, held-out and bigram losses (nats/byte), time spent in updates and
        bytes per second.
        """
        from tqdm import tqdm

        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
        log.info("training %s on %s: steps %d..%d of %d windows x %d bytes, device %s", self.brain.name, cfg.data,
                 self.step, end, cfg.batch, cfg.seq_len, cfg.device)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        first_step, train_seconds = self.step, 0.0
        try:
            if self.step == 0 and cfg.eval_every and not self.history["held_out"]:
                self._record_held_out(bar)
            while self.step < end:
                sampler_state = self.sampler.state_dict()
                try:
                    tick = time.perf_counter()
                    loss, _ = self.train_step(self.sampler.sample())
                    elapsed = time.perf_counter() - tick
                except KeyboardInterrupt:
                    self.sampler.load_state_dict(sampler_state)  # the interrupted step never happened
                    raise
                train_seconds += elapsed
                self.history["train"].append([self.step, loss])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{cfg.batch * cfg.seq_len / elapsed:.0f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._record_held_out(bar)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self.save()
            if self.step == cfg.steps and (not self.history["held_out"] or self.history["held_out"][-1][0] != self.step):
                self._record_held_out(bar)
        except KeyboardInterrupt:
            bar.close()
            self.save()
            log.warning("interrupted at step %d; checkpoint saved to %s", self.step, self.out)
            raise
        bar.close()
        self.save()
        steps_run = self.step - first_step
        return {
            "steps": self.step,
            "held_out": self.history["held_out"][-1][1] if self.history["held_out"] else float("nan"),
            "bigram": self.baseline,
            "train_seconds": train_seconds,
            "tokens_per_second": steps_run * cfg.batch * cfg.seq_len / train_seconds if train_seconds else float("nan"),
        }

    def _record_held_out(self, bar) -> None:
        value = self.evaluate()
        self.history["held_out"].append([self.step, value])
        message = f"step {self.step}: held-out {value:.4f} nats/byte (bigram baseline {self.baseline:.4f})"
        if bar is not None and self.progress:
            bar.write(message)
        else:
            log.info(message)

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            config={"brain": self.brain.to_dict(), "preset": self.cfg.preset, "vocab": VOCAB_BYTES},
            params=_host(self.params),
            buffers=_host(self.buffers),
            trainer={
                "step": self.step,
                "train_config": self.cfg.to_dict(),
                "sampler": self.sampler.state_dict(),
                "history": self.history,
                "bigram_baseline": self.baseline,
            },
            opt_state=_host(self.opt_state),
        )

    def save(self) -> dict[str, Path]:
        """Write the checkpoint files and the loss-curve PNG beside them."""
        paths = save_checkpoint(self.out, self.checkpoint())
        plot_losses(self.history, self.baseline, paths["plot"], title=f"{self.brain.name} on {Path(self.cfg.data).name}")
        log.info("saved checkpoint %s at step %d", self.out, self.step)
        return paths


# --------------------------------------------------------------------------------------------
# Loss curve


def plot_losses(history: dict, baseline: float, path: str | Path, title: str = "") -> None:
    """Write the training and held-out loss curves (nats/byte) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train (per step)")
    if history["held_out"]:
        steps, losses = zip(*history["held_out"])
        ax.plot(steps, losses, "o-", label="held-out")
    ax.axhline(baseline, color="gray", ls="--", label=f"bigram baseline {baseline:.3f}")
    # Untrained heads can start far above a uniform guess (ln 256); keep the trained range readable.
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, min(top, math.log(VOCAB_BYTES) + 1.0))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


__all__ = [
    "PRESET_NAMES",
    "TrainConfig",
    "TrainError",
    "Trainer",
    "build_brain",
    "learning_rate",
    "plot_losses",
    "single_ctm",
]
