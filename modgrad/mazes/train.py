"""Train a single CTM or an eight-region brain to predict maze routes, and score it on held-out mazes.

Each step draws 8 fresh mazes, encodes them into 121 spatial tokens (11 x 11 cells, 128 features)
with the fixed visual encoder, and trains on the first 20 moves of the shortest route with the
step-wise cross-entropy and its auto-curriculum (``StepwiseCE``). Every model makes 16
predictions (one per tick or outer tick) of 100 logits, 5 per route position.

Two protocols:

- ``reference`` reproduces the reference benchmark's setup. The single CTM attends over all
  121 tokens and is trained by clipped SGD (lr / batch on the batch-summed gradient, clip 5 on
  the norm of a few tensors). The brain reads only token 0, the top-left cell, and is trained
  by the reference's RegionalAdamW rule. Both train only the tensors the reference trains.
- ``fair`` gives both models the same information and optimiser. The brain's input region
  attends over all 121 tokens (a spatial region), and both models train every parameter with
  AdamW and global-norm clipping of the batch-mean gradient.

Gradients are exact in both protocols. The reference's hand-written backward pass truncates
them (see docs/MAZES.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import modgrad as mg
from modgrad import ops
from modgrad.checkpoint import Checkpoint, load_checkpoint, restructure, save_checkpoint
from modgrad.files import atomic_write
from modgrad.ctm.config import CtmConfig, ExitStrategy
from modgrad.ctm.model import certainty, ctm_forward
from modgrad.ctm.weights import count_params, init_ctm
from modgrad.engine.compile import DEVICES, _to_host
from modgrad.engine.pytree import tree_flatten, tree_map, tree_unflatten
from modgrad.graph import RegionalConfig, brain_step, eight_region_small, init_brain, init_brain_state
from modgrad.graph.config import INPUT
from modgrad.losses import StepwiseCE
from modgrad.mazes.encode import MazeBatch, MazeDataset, VisualEncoder
from modgrad.mazes.generate import DOWN, N_ACTIONS, RIGHT, ROUTE_LEN, MazeRng, generate_mazes, route_targets
from modgrad.mazes.metrics import RouteScores, moves_from_logits, score_routes
from modgrad.optim import AdamW, ReferenceRegionalAdamW, clip_by_global_norm, global_norm, tree_paths

log = logging.getLogger(__name__)

MODELS = ("ctm", "brain")
PROTOCOLS = ("reference", "fair")
GRADIENTS = ("exact", "truncated")
REFERENCE_CLIP = 5.0  # both reference optimisers clip at 5 on batch-summed gradients
FAIR_CLIP = 1.0  # on the batch-mean gradient


# --------------------------------------------------------------------------------------------
# Settings


@dataclass
class MazeTrainConfig:
    """Settings of one maze training run.

    model: "ctm" (single CTM) or "brain" (eight_region_small). protocol: "reference" or "fair".
    size: maze side in cells (odd; 21 gives 11 x 11 tokens). ticks: CTM ticks, or the brain's
    outer ticks and each region's ticks. d_model: single-CTM neurons (its attention width is
    max(min(128, d_model / 2), 32)). route_len: moves predicted per maze. lookahead: positions
    past the correct prefix that the curriculum trains. clip: gradient-norm limit (None: 5.0 on
    the batch-summed gradient for reference, 1.0 on the batch-mean gradient for fair).
    weight_decay: AdamW's decoupled decay (fair protocol and the reference brain).
    heldout: evaluation mazes from MazeRng(seed + 999). eval_every: steps between held-out
    evaluations during training (0: only at the end). budget_s: stop training after this many
    seconds of wall time and score the model reached (0: no limit). device: "numpy", "cpu" or "gpu".
    checkpoint: save the run there (safetensors and JSON) at every evaluation and when training
    stops; a run started with the same path and settings continues from the saved step. "" turns
    it off. gradients: "exact" (full backpropagation through time) or, for the brain only,
    "truncated": no gradient crosses an outer-tick boundary, as in the reference's backward pass.
    """

    model: str = "ctm"
    protocol: str = "reference"
    size: int = 21
    steps: int = 5000
    batch: int = 8
    lr: float = 3e-4
    seed: int = 42
    ticks: int = 16
    d_model: int = 256
    route_len: int = ROUTE_LEN
    lookahead: int = 5
    clip: float | None = None
    weight_decay: float = 0.01
    heldout: int = 200
    eval_every: int = 0
    budget_s: float = 0.0
    device: str = "numpy"
    checkpoint: str = ""
    gradients: str = "exact"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.gradients not in GRADIENTS:
            raise ValueError(f"unknown gradients {self.gradients!r}; choose one of {', '.join(GRADIENTS)}")
        if self.gradients == "truncated" and self.model != "brain":
            raise ValueError("gradients='truncated' is implemented for the brain only; the single CTM trains with exact gradients")
        for name in ("steps", "batch", "ticks", "d_model", "route_len", "heldout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.size < 5:
            raise ValueError(f"size must be at least 5 cells, got {self.size}")
        if self.lookahead < 0 or self.eval_every < 0 or self.budget_s < 0:
            raise ValueError(f"lookahead, eval_every and budget_s must be >= 0, got "
                             f"{self.lookahead}, {self.eval_every}, {self.budget_s}")
        if not self.lr > 0 or (self.clip is not None and not self.clip > 0):
            raise ValueError(f"lr and clip must be positive, got lr={self.lr}, clip={self.clip}")

    @property
    def grad_clip(self) -> float:
        if self.clip is not None:
            return self.clip
        return REFERENCE_CLIP if self.protocol == "reference" else FAIR_CLIP

    @property
    def out_dims(self) -> int:
        return self.route_len * N_ACTIONS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_identity(self) -> dict:
        """Return the settings a resumed run must share with the saved one (all but its length and timing)."""
        return {k: v for k, v in self.to_dict().items() if k not in _RESUMABLE}


# Settings that may change between the start and the continuation of a checkpointed run.
_RESUMABLE = ("steps", "eval_every", "budget_s", "checkpoint", "device", "heldout")


# --------------------------------------------------------------------------------------------
# Models


def maze_ctm_config(ticks: int = 16, d_model: int = 256, out_dims: int = ROUTE_LEN * N_ACTIONS) -> CtmConfig:
    """Return the single CTM of the maze benchmark (450,325 parameters at the defaults)."""
    return CtmConfig(
        ticks=ticks,
        d_model=d_model,
        d_input=max(min(128, d_model // 2), 32),
        heads=4,
        n_synch_out=d_model,
        n_synch_action=d_model,
        synapse_depth=4,
        memory_length=16,
        deep_nlms=True,
        memory_hidden_dims=8,
        out_dims=out_dims,
        min_width=16,
        exit_strategy=ExitStrategy.adaptive_gate(0.1, 0.99),
        name="maze_ctm",
    )


def maze_brain_config(protocol: str, ticks: int = 16, out_dims: int = ROUTE_LEN * N_ACTIONS,
                      token_dim: int = 128, n_tokens: int = 121) -> RegionalConfig:
    """Return eight_region_small(token_dim, out_dims, ticks); under "fair" its input region is spatial.

    187,881 parameters at the defaults (189,673 with the spatial input region, whose kv_proj
    reads the 128-wide tokens instead of a 16-wide edge output).
    """
    cfg = eight_region_small(token_dim, out_dims, ticks)
    if protocol == "fair":
        cfg = cfg.replace(spatial_tokens=n_tokens, spatial_regions=(INPUT,), name="eight_region_small_spatial")
    return cfg


@dataclass
class MazeModel:
    """A model with its weights and the forward pass that maps maze tokens to per-tick route logits.

    forward(params, buffers, tokens (B, n, 128)) -> (preds (B, K, out_dims), certainties (B, K, 2)).
    """

    kind: str
    config: CtmConfig | RegionalConfig
    params: dict
    buffers: dict
    forward: Callable
    encoder: VisualEncoder

    @property
    def n_params(self) -> int:
        return count_params(self.params)


def build_model(cfg: MazeTrainConfig) -> MazeModel:
    """Build and initialise the model of a run (weights follow the reference init with seed 42).

    The single CTM uses the encoder with Gabor V1 blocks, the brain the fully random one, as in
    the reference. The brain's observation under "reference" is token 0 only.
    """
    if cfg.model == "ctm":
        encoder = VisualEncoder.single_ctm(cfg.size | 1)
        ctm = maze_ctm_config(cfg.ticks, cfg.d_model, cfg.out_dims)
        params, buffers = init_ctm(ctm, encoder.token_dim, seed=42)

        def forward(params, buffers, tokens):
            preds, certainties, _ = ctm_forward(params, buffers, ctm, tokens)
            return preds, certainties

        return MazeModel("ctm", ctm, params, buffers, forward, encoder)

    encoder = VisualEncoder.brain(cfg.size | 1)
    brain = maze_brain_config(cfg.protocol, cfg.ticks, cfg.out_dims, encoder.token_dim, encoder.n_tokens)
    params, buffers = init_brain(brain, seed=42)

    def forward(params, buffers, tokens):
        obs = tokens if brain.is_spatial else tokens[:, 0]  # (B, n, 128) or (B, 128)
        state = init_brain_state(params, brain, ops.shape_of(tokens)[0])
        logits, _ = brain_step(params, buffers, brain, obs, state, truncate_gradients=cfg.gradients == "truncated")
        return logits, certainty(logits)

    return MazeModel("brain", brain, params, buffers, forward, encoder)


# --------------------------------------------------------------------------------------------
# Optimisers


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


# Tensors the reference's single-CTM backward pass never reaches; the rest are trained by SGD.
CTM_FROZEN = (r"kv_proj/.*", r"kv_ln/.*", r"start_trace", r"decay_out", r"decay_action", r"exit_gate/.*")
CTM_CLIP_NORM = (r"nlm/stage1/w", r"nlm/stage1/b", r"output_proj/w", r"output_proj/b", r"q_proj/w")

# The brain's maze loop copies only these gradients into the sum it hands to RegionalAdamW.
BRAIN_TRAINED = (
    r"regions/\d+/nlm/stage1/.*",
    r"regions/\d+/(kv_proj|q_proj|mha_in|mha_out|output_proj)/.*",
    r"output_proj/.*",
    r"edges/\d+/.*",
)
BRAIN_FROZEN = (r"regions/\d+/decay_(out|action)", r"router/.*", r"outer_exit_gate/.*", r"extra_heads/.*")
BRAIN_SGD = (r"regions/\d+/(synapse/.*|start_activated|start_trace|kv_ln/.*|exit_gate/.*)",)
BRAIN_NO_DECAY = (r"embeddings", r"global_decay", r".*/b")
BRAIN_CLIP_NORM = (
    r"embeddings",
    r"output_proj/.*",
    r"obs_proj/.*",
    r"edges/\d+/.*",
    r"regions/\d+/(nlm/stage1|output_proj|q_proj|kv_proj)/w",
)


def ctm_reference_group(path: str, array) -> str:
    return "frozen" if _matches(path, CTM_FROZEN) else "sgd"


def brain_reference_group(path: str, array) -> str:
    if _matches(path, BRAIN_FROZEN):
        return "frozen"
    if _matches(path, BRAIN_SGD):
        return "sgd"
    return "adam" if _matches(path, BRAIN_NO_DECAY) else "adamw"


@dataclass
class MazeOptimizer:
    """The update rule of a run, applied to the gradient of the batch-summed or batch-mean loss.

    sum_loss: gradients come from the loss summed over the batch (the reference sums per-maze
    gradients). trained(path) selects the tensors whose gradients are kept; the rest get zero.
    """

    rule: AdamW | ReferenceRegionalAdamW
    sum_loss: bool
    clip: float | None
    trained: Callable[[str], bool]

    def init(self, params) -> dict:
        return self.rule.init(params)

    def update(self, params, grads, state):
        """Return (params, state, gradient norm) after one step."""
        leaves, treedef = tree_flatten(grads)
        kept = [g if self.trained(p) else g * 0.0 for p, g in zip(tree_paths(grads), leaves)]
        grads = tree_unflatten(treedef, kept)
        if self.clip is not None:
            grads, norm = clip_by_global_norm(grads, self.clip)
        else:
            norm = global_norm(grads)
        params, state = self.rule.update(params, grads, state)
        return params, state, norm


def make_optimizer(cfg: MazeTrainConfig) -> MazeOptimizer:
    """Return the protocol's optimiser for the run's model."""
    if cfg.protocol == "fair":
        rule = AdamW(lr=cfg.lr, weight_decay=cfg.weight_decay)
        return MazeOptimizer(rule, sum_loss=False, clip=cfg.grad_clip, trained=lambda path: True)
    if cfg.model == "ctm":
        # CtmGradients::apply(lr / n, clip): plain SGD on the summed gradients, with lr scaled by
        # min(1, clip / n) where n is the norm of five tensors' gradients.
        rule = ReferenceRegionalAdamW(group=ctm_reference_group, lr=cfg.lr / cfg.batch, grad_clip=cfg.grad_clip,
                                      clip_mask=lambda path, array: _matches(path, CTM_CLIP_NORM))
        return MazeOptimizer(rule, sum_loss=True, clip=None, trained=lambda path: not _matches(path, CTM_FROZEN))
    rule = ReferenceRegionalAdamW(group=brain_reference_group, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  grad_clip=cfg.grad_clip, clip_mask=lambda path, array: _matches(path, BRAIN_CLIP_NORM))
    return MazeOptimizer(rule, sum_loss=True, clip=None, trained=lambda path: _matches(path, BRAIN_TRAINED))


# --------------------------------------------------------------------------------------------
# Programs


def make_train_step(model: MazeModel, cfg: MazeTrainConfig, optimizer: MazeOptimizer):
    """Return step(params, opt_state, buffers, tokens, targets) -> (mean loss, last-tick logits, grad norm, params, opt_state)."""
    loss_fn = StepwiseCE(n_classes=N_ACTIONS, lookahead=cfg.lookahead)

    def objective(params, buffers, tokens, targets):
        preds, certainties = model.forward(params, buffers, tokens)
        per_maze = loss_fn.per_example(preds, targets, certainties)  # (B,)
        total = ops.sum(per_maze) if optimizer.sum_loss else ops.mean(per_maze)
        return total, (ops.mean(per_maze), preds[:, -1])

    def train_step(params, opt_state, buffers, tokens, targets):
        (_, (loss, last)), grads = mg.value_and_grad(objective, has_aux=True)(params, buffers, tokens, targets)
        params, opt_state, norm = optimizer.update(params, grads, opt_state)
        return loss, last, norm, params, opt_state

    return mg.compile(train_step, device=cfg.device, name=f"maze_train_{model.kind}_{cfg.protocol}")


def make_predict(model: MazeModel, device: str):
    """Return predict(params, buffers, tokens (B, n, 128)) -> last-tick logits (B, out_dims)."""

    def predict(params, buffers, tokens):
        preds, _ = model.forward(params, buffers, tokens)
        return preds[:, -1]

    return mg.compile(predict, device=device, name=f"maze_predict_{model.kind}")


def _host(x) -> np.ndarray:
    return np.asarray(_to_host(x))


def predict_moves(predict, params, buffers, tokens: np.ndarray, chunk: int) -> np.ndarray:
    """Run predict over tokens in chunks of `chunk` mazes and return argmax moves (N, route_len).

    The last chunk is padded to full size, so a compiled program gets a single input shape.
    """
    moves = []
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        n = len(part)
        if n < chunk:
            part = np.concatenate([part, np.repeat(part[:1], chunk - n, 0)])
        moves.append(moves_from_logits(_host(predict(params, buffers, part)))[:n])
    return np.concatenate(moves)


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class MazeRun:
    """Result of `train_mazes`: the final scores and the run's history."""

    config: MazeTrainConfig
    n_params: int
    scores: RouteScores
    history: dict
    train_seconds: float
    wall_seconds: float
    params: dict
    heldout_moves: np.ndarray

    @property
    def first_step_seconds(self) -> float:
        """Time of step 1, which includes tracing and, on cpu or gpu, compiling the train step."""
        return self.history["train"][0][4]

    @property
    def steps_per_second(self) -> float:
        """Steady-state update rate: steps 2..N over their summed time (step 1 alone when steps = 1)."""
        times = [row[4] for row in self.history["train"][1:]] or [self.first_step_seconds]
        return len(times) / sum(times)

    def summary(self) -> dict:
        """Return the JSON-ready result line."""
        return {
            "model": self.config.model,
            "protocol": self.config.protocol,
            "gradients": self.config.gradients,
            "params": self.n_params,
            "steps": len(self.history["train"]),
            "seed": self.config.seed,
            "size": self.config.size,
            "device": self.config.device,
            "first_step": self.scores.first_step,
            "per_step": self.scores.per_step,
            "correct_prefix": self.scores.correct_prefix,
            "n_mazes": self.scores.n_mazes,
            "first_step_s": self.first_step_seconds,
            "steps_per_s": self.steps_per_second,
            "wall_s": self.wall_seconds,
        }


class Evaluator:
    """Scorer of a model on the fixed held-out mazes."""

    def __init__(self, model: MazeModel, cfg: MazeTrainConfig, heldout: MazeBatch):
        self.heldout = heldout
        self.predict = make_predict(model, cfg.device)
        # The eager evaluator pays per op, not per maze, so numpy scores all mazes in one batch.
        self.chunk = len(heldout.tokens) if cfg.device == "numpy" else cfg.batch

    def moves(self, params, buffers) -> np.ndarray:
        return predict_moves(self.predict, params, buffers, self.heldout.tokens, self.chunk)

    def score(self, params, buffers) -> tuple[RouteScores, np.ndarray]:
        moves = self.moves(params, buffers)
        return score_routes(moves, self.heldout.targets, self.heldout.path_lengths), moves


def train_mazes(cfg: MazeTrainConfig, progress: bool = True) -> MazeRun:
    """Train one model for cfg.steps steps and score it on the held-out mazes.

    History: "train" rows [step, loss, grad_norm, train_per_step_acc, seconds] per step, and
    "eval" rows [step, first_step, per_step, correct_prefix] at every eval point.
    """
    from tqdm import tqdm

    wall_start = time.perf_counter()
    model = build_model(cfg)
    optimizer = make_optimizer(cfg)
    data = MazeDataset(cfg.size, cfg.seed, cfg.batch, cfg.route_len, encoder=model.encoder)
    heldout = data.heldout(cfg.heldout)
    evaluator = Evaluator(model, cfg, heldout)
    step_fn = make_train_step(model, cfg, optimizer)
    params, buffers = model.params, model.buffers
    opt_state = optimizer.init(params)
    log.info("training %s (%s protocol, %d parameters) for %d steps on %s", model.kind, cfg.protocol,
             model.n_params, cfg.steps, cfg.device)

    history: dict = {"train": [], "eval": []}
    train_seconds = 0.0
    first = 1
    if cfg.checkpoint and Path(cfg.checkpoint).exists():
        params, opt_state, history, train_seconds = _resume(cfg, model, optimizer, data, opt_state)
        first = len(history["train"]) + 1
        log.info("continuing %s from step %d", cfg.checkpoint, first - 1)
    recent = [row[3] for row in history["train"][-50:]]  # per-step training accuracy of the last 50 steps
    bar = tqdm(total=cfg.steps, initial=first - 1, disable=not progress, unit="step", dynamic_ncols=True)
    train_start = time.perf_counter()
    for step in range(first, cfg.steps + 1):
        if cfg.budget_s and time.perf_counter() - train_start > cfg.budget_s:
            log.info("stopping at step %d of %d: the %.0f s budget is spent", step - 1, cfg.steps, cfg.budget_s)
            break
        batch = data.next_batch()
        tick = time.perf_counter()
        loss, last, norm, params, opt_state = step_fn(params, opt_state, buffers, batch.tokens, batch.targets)
        loss, last, norm = float(_host(loss)), _host(last), float(_host(norm))
        elapsed = time.perf_counter() - tick
        train_seconds += elapsed
        if not math.isfinite(loss):
            raise FloatingPointError(f"maze training loss became {loss} at step {step}; lower --lr (now {cfg.lr})")

        moves = moves_from_logits(last)
        recent = (recent + [float(np.mean(moves == batch.targets))])[-50:]
        history["train"].append([step, loss, norm, recent[-1], elapsed])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{np.mean(recent):.3f}", steps_s=f"{1.0 / elapsed:.2f}")

        out_of_time = cfg.budget_s and time.perf_counter() - train_start > cfg.budget_s
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and not out_of_time:
            scores, _ = evaluator.score(params, buffers)
            history["eval"].append([step, scores.first_step, scores.per_step, scores.correct_prefix])
            bar.write(f"step {step}: held-out first-step {scores.first_step:.3f}  per-step {scores.per_step:.3f}  "
                      f"prefix {scores.correct_prefix:.2f}")
            if cfg.checkpoint:
                _save_run(cfg, model, params, opt_state, data, history, train_seconds)
    bar.close()

    scores, moves = evaluator.score(params, buffers)
    final = [len(history["train"]), scores.first_step, scores.per_step, scores.correct_prefix]
    if history["eval"] and history["eval"][-1][0] == final[0]:
        history["eval"][-1] = final  # a continued run that had already reached its last step
    else:
        history["eval"].append(final)
    if cfg.checkpoint:
        _save_run(cfg, model, params, opt_state, data, history, train_seconds)
    params = tree_map(_host, params)
    return MazeRun(cfg, model.n_params, scores, history, train_seconds, time.perf_counter() - wall_start,
                   params, moves)


def _save_run(cfg: MazeTrainConfig, model: MazeModel, params, opt_state, data: MazeDataset, history: dict,
              train_seconds: float) -> None:
    """Write the run's weights, optimiser state and position in the maze stream to cfg.checkpoint."""
    trainer = {"settings": cfg.run_identity(), "rng_state": str(data.rng.state), "history": history,
               "train_seconds": train_seconds}
    ckpt = Checkpoint(config={"maze_run": cfg.to_dict()}, params=tree_map(_host, params),
                      buffers=tree_map(_host, model.buffers), trainer=trainer, opt_state=tree_map(_host, opt_state))
    save_checkpoint(cfg.checkpoint, ckpt)


def _resume(cfg: MazeTrainConfig, model: MazeModel, optimizer: MazeOptimizer, data: MazeDataset, opt_state):
    """Load cfg.checkpoint into (params, opt_state, history, train_seconds) and move the maze stream on."""
    ckpt = load_checkpoint(cfg.checkpoint, with_optimizer=True)
    saved = ckpt.trainer.get("settings")
    if saved is not None:
        saved = {"gradients": "exact", **saved}  # runs saved before that setting existed were exact
    if saved != cfg.run_identity():
        changed = sorted(k for k in cfg.run_identity() if saved is None or saved.get(k) != cfg.run_identity()[k])
        raise ValueError(f"checkpoint {cfg.checkpoint} was saved by a run with other settings ({', '.join(changed)}); "
                         "use the same settings to continue it, or another --checkpoint path")
    data.rng.state = int(ckpt.trainer["rng_state"])
    params = restructure(ckpt.params, model.params)
    opt_state = restructure(ckpt.opt_state, opt_state)
    return params, opt_state, ckpt.trainer["history"], float(ckpt.trainer["train_seconds"])


# --------------------------------------------------------------------------------------------
# Baselines and pictures


def trivial_baselines(size: int = 21, seed: int = 42, heldout: int = 200, route_len: int = ROUTE_LEN,
                      fit_mazes: int = 1000) -> dict[str, dict]:
    """Score rules that read nothing (or one cell) on the held-out mazes; returns name -> scores.

    always_down / always_right: the same move at every position. majority: the most frequent
    move of each position over `fit_mazes` mazes of the training stream MazeRng(seed).
    open_neighbour: Right if the cell right of the start is open and the one below is a wall,
    else Down, then Down for the rest (reads two cells next to the start).
    """
    test = generate_mazes(heldout, size | 1, MazeRng(seed + 999))
    targets = np.stack([route_targets(m.route, route_len) for m in test])
    lengths = np.array([m.path_length for m in test])
    fit = generate_mazes(fit_mazes, size | 1, MazeRng(seed))
    fit_targets = np.stack([route_targets(m.route, route_len) for m in fit])
    majority = np.array([np.bincount(fit_targets[:, p], minlength=N_ACTIONS).argmax() for p in range(route_len)])

    def rule(first: np.ndarray, rest: int) -> np.ndarray:
        moves = np.full((len(test), route_len), rest, dtype=np.int64)
        moves[:, 0] = first
        return moves

    open_first = np.array([RIGHT if (not m.walls[m.start[0], m.start[1] + 1] and m.walls[m.start[0] + 1, m.start[1]])
                           else DOWN for m in test])
    predictions = {
        "always_down": rule(np.full(len(test), DOWN), DOWN),
        "always_right": rule(np.full(len(test), RIGHT), RIGHT),
        "majority": np.tile(majority, (len(test), 1)),
        "open_neighbour": rule(open_first, DOWN),
    }
    return {name: dataclasses.asdict(score_routes(moves, targets, lengths)) for name, moves in predictions.items()}


def render_predictions(path: str | Path, heldout: MazeBatch, moves: np.ndarray, count: int = 6, title: str = "") -> Path:
    """Draw the first `count` held-out mazes with their true and predicted routes into one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from modgrad.mazes.render import draw_maze

    count = min(count, len(heldout.mazes))
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.2 * cols, 5.4 * rows))
    FigureCanvasAgg(fig)
    for i in range(count):
        ax = fig.add_subplot(rows, cols, i + 1)
        draw_maze(ax, heldout.mazes[i], moves[i])
        ax.set_title(f"held-out maze {i}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.92 if title else 0.96, bottom=0.08, hspace=0.45, wspace=0.05)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def save_history(path: str | Path, run: MazeRun) -> Path:
    """Write the run's settings, history and result line as JSON."""
    record = {"config": run.config.to_dict(), "summary": run.summary(), "history": run.history}
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record)))


def plot_curves(path: str | Path, histories: list[str | Path], baselines: dict[str, dict] | None = None) -> Path:
    """Plot training loss (mean of 50 steps) and held-out accuracy of saved runs into one PNG.

    histories: JSON files written by `save_history`. baselines: `trivial_baselines` output,
    drawn as horizontal lines on the accuracy panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    loss_ax, first_ax, step_ax = (fig.add_subplot(1, 3, i + 1) for i in range(3))
    colors: dict[str, str] = {}  # one colour per (model, protocol), shared by its seeds
    runs_drawn: dict[str, int] = {}  # per kind, so that each seed of a kind gets its own line style
    for history_path in histories:
        record = json.loads(Path(history_path).read_text())
        summary, history = record["summary"], record["history"]
        cut = ", truncated gradients" if summary.get("gradients") == "truncated" else ""
        run_kind = f"{summary['model']} ({summary['protocol']}{cut})"
        color = colors.setdefault(run_kind, f"C{len(colors)}")
        drawn = runs_drawn.get(run_kind, 0)
        runs_drawn[run_kind] = drawn + 1
        style = ("-", "--", ":", "-.")[drawn % 4]
        label = f"{run_kind}, seed {summary['seed']}"
        train = np.array(history["train"], dtype=np.float64)
        window = min(50, len(train))
        smooth = np.convolve(train[:, 1], np.ones(window) / window, mode="valid")
        loss_ax.plot(train[window - 1 :, 0], smooth, color=color, linestyle=style, label=label)
        evals = np.array(history["eval"], dtype=np.float64)
        first_ax.plot(evals[:, 0], evals[:, 1], marker="o", color=color, linestyle=style, label=label)
        step_ax.plot(evals[:, 0], evals[:, 2], marker="o", color=color, linestyle=style, label=label)
    for name, scores in (baselines or {}).items():
        first_ax.axhline(scores["first_step"], color="gray", lw=0.8, ls="--")
        step_ax.axhline(scores["per_step"], color="gray", lw=0.8, ls="--")
        step_ax.annotate(name, (0, scores["per_step"]), fontsize=7, color="gray", xycoords=("axes fraction", "data"))
    loss_ax.set(title="training loss (StepwiseCE, mean of 50 steps)", xlabel="step", ylabel="loss")
    first_ax.set(title="held-out first-step accuracy", xlabel="step", ylim=(0, 1.05))
    step_ax.set(title="held-out per-step accuracy (20 moves)", xlabel="step", ylim=(0, 1.0))
    loss_ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


__all__ = [
    "MODELS",
    "PROTOCOLS",
    "MazeModel",
    "MazeOptimizer",
    "MazeRun",
    "MazeTrainConfig",
    "build_model",
    "make_optimizer",
    "make_predict",
    "make_train_step",
    "maze_brain_config",
    "maze_ctm_config",
    "plot_curves",
    "render_predictions",
    "save_history",
    "train_mazes",
    "trivial_baselines",
]
