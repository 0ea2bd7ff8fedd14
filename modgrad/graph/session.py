"""Per-token training of a brain, eagerly on numpy, in the shape of the reference's quick-start::

    cfg = RegionalConfig.eight_region_small(obs_dim=128, out_dims=256, ticks=16)
    w = RegionalWeights(cfg)
    opt = RegionalAdamW(w).with_lr(3e-4)
    grads = RegionalGradients.zeros(w)
    for token, target in data:
        loss, pred = regional_train_token(w, grads, token, target)
        opt.step(w, grads)
        grads.zero()

Each call runs one token through ``brain_step`` and takes exact gradients with ``mg.value_and_grad``.
The brain's state carries from token to token, but each token's gradient stops at the state it
received, so this is backpropagation through time truncated to one token. ``Trainer`` in
modgrad.train backpropagates through whole windows of tokens in one compiled program, so use it
for real training runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import modgrad as mg
from modgrad import ops
from modgrad.engine.pytree import tree_flatten, tree_map, tree_unflatten
from modgrad.graph.brain import brain_step, init_brain_state
from modgrad.graph.config import RegionalConfig
from modgrad.graph.weights import init_brain
from modgrad.losses import ImaginationLoss
from modgrad.optim import AdamW, ReferenceRegionalAdamW, clip_by_global_norm, global_norm, tree_paths


class RegionalWeights:
    """A brain's parameters and buffers, and the recurrent state it carries from token to token.

    ``state`` starts as the brain's start state (every region at its learned start activation and
    trace, global sync alpha 0 and beta 1) and advances with each ``regional_train_token`` call.
    The reference trains every token from the start state instead. Call ``reset_state()`` before
    each token to do the same.
    """

    def __init__(self, cfg: RegionalConfig, seed: int = 42):
        params, buffers = init_brain(cfg, seed=seed)
        self._set(cfg, params, buffers)

    @classmethod
    def from_arrays(cls, cfg: RegionalConfig, params: dict, buffers: dict) -> "RegionalWeights":
        """Wrap existing (params, buffers), for example those ``modgrad.checkpoint.restore_weights`` returns."""
        w = cls.__new__(cls)
        w._set(cfg, params, buffers)
        return w

    def _set(self, cfg: RegionalConfig, params: dict, buffers: dict) -> None:
        self.cfg = cfg
        self.params = params
        self.buffers = buffers
        self._state: dict | None = None  # None: start from the start state of the current params

    @property
    def state(self) -> dict:
        """The state the next token starts from, batch 1 (see ``init_brain_state`` for its tree)."""
        if self._state is None:
            return init_brain_state(self.params, self.cfg, 1)
        return self._state

    def reset_state(self) -> None:
        """Return to the start state, which the next token builds from the start parameters as they are then."""
        self._state = None


class RegionalGradients:
    """Gradients summed over the tokens since the last ``zero()``, in ``tree`` with the structure of ``w.params``."""

    def __init__(self, tree: dict):
        self.tree = tree

    @classmethod
    def zeros(cls, w: RegionalWeights) -> "RegionalGradients":
        return cls(tree_map(lambda p: ops.zeros(ops.shape_of(p), ops.dtype_of(p)), w.params))

    def zero(self) -> None:
        """Reset every gradient to zero. Optimiser steps leave the gradients as they are."""
        self.tree = tree_map(lambda g: g * 0.0, self.tree)

    def add(self, tree: dict) -> None:
        """Add a gradient tree of the same structure (one token's gradients) to the sums."""
        leaves, treedef = tree_flatten(self.tree)
        new_leaves, new_treedef = tree_flatten(tree)
        if new_treedef != treedef:
            raise ValueError("the added gradient tree does not match these gradients. Build both from the same weights")
        self.tree = tree_unflatten(treedef, [ops.add(a, b) for a, b in zip(leaves, new_leaves)])

    def norm(self) -> float:
        """Global L2 norm of all gradients."""
        return float(global_norm(self.tree))


# --------------------------------------------------------------------------------------------
# One token


def _is_token_id(token) -> bool:
    if isinstance(token, (bool, np.bool_)):
        return False
    if isinstance(token, (int, np.integer)):
        return True
    return isinstance(token, np.ndarray) and token.ndim == 0 and np.issubdtype(token.dtype, np.integer)


def _check_token_id(cfg: RegionalConfig, token) -> int:
    token = int(token)
    if cfg.is_spatial:
        raise ValueError(
            f"token id {token} given, but brain {cfg.name!r} takes token-set observations. "
            f"Pass an array of shape ({cfg.spatial_tokens}, {cfg.raw_obs_dim})"
        )
    if not 0 <= token < cfg.out_dims:
        raise ValueError(
            f"token id {token} is outside the embedding table of {cfg.out_dims} ids. Pass an id in 0..{cfg.out_dims - 1}"
        )
    return token


def _check_observation(cfg: RegionalConfig, token, dtype) -> np.ndarray:
    """Return a float observation as a batch of one: (1, raw_obs_dim) or (1, spatial_tokens, raw_obs_dim)."""
    obs = np.asarray(token)
    expected = (cfg.spatial_tokens, cfg.raw_obs_dim) if cfg.is_spatial else (cfg.raw_obs_dim,)
    if not np.issubdtype(obs.dtype, np.floating):
        raise ValueError(
            f"token must be an integer id or a float observation of shape {expected}, got dtype {obs.dtype} "
            f"and shape {obs.shape}"
        )
    if obs.shape != expected:
        raise ValueError(f"observation shape {obs.shape} does not match the brain's {expected}. Pass an array of shape {expected}")
    return obs.astype(dtype, copy=False)[None]


def _check_target(cfg: RegionalConfig, target) -> int:
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer)):
        raise ValueError(f"target {target!r} is not an integer. Pass a class id in 0..{cfg.out_dims - 1}")
    if not 0 <= int(target) < cfg.out_dims:
        raise ValueError(f"target {int(target)} is outside the brain's {cfg.out_dims} classes. Pass a class id in 0..{cfg.out_dims - 1}")
    return int(target)


def regional_train_token(w: RegionalWeights, grads: RegionalGradients, token, target, loss=None) -> tuple[float, int]:
    """Run one token, add its gradients to ``grads`` and advance ``w.state``. Return (loss, prediction).

    token: an integer id, looked up in ``params["embeddings"]`` so the embedding row gets a gradient
    too, or a float observation of shape (raw_obs_dim,), or (spatial_tokens, raw_obs_dim) for a
    spatial brain. target: the class id the brain should predict. loss: any loss of modgrad.losses
    over the outer-tick predictions (1, K, out_dims). The default, ImaginationLoss(0.5, 0.1), is the
    reference's. prediction: the argmax of the last outer tick's logits, the last index among ties.

    The forward pass is the training forward of ``brain_forward_tokens``: region sync accumulators
    continue across outer ticks and tokens. ``w.state`` enters the gradient as a constant, so no
    gradient crosses from this token into earlier ones. After ``reset_state()`` the start state is
    built inside the differentiated function, so the start activations and traces get gradients.
    """
    cfg = w.cfg
    target = _check_target(cfg, target)
    loss_fn = ImaginationLoss() if loss is None else loss
    token_id = _check_token_id(cfg, token) if _is_token_id(token) else None
    obs = None if token_id is not None else _check_observation(cfg, token, ops.dtype_of(w.params["embeddings"]))
    carried = w._state

    def objective(params):
        x = obs if token_id is None else ops.gather(params["embeddings"], np.asarray([token_id], np.int64), axis=0)
        state = init_brain_state(params, cfg, 1) if carried is None else carried
        logits, state = brain_step(params, w.buffers, cfg, x, state)  # (1, K, out_dims)
        value = loss_fn(logits, np.asarray([target], np.int64))
        return value, (logits, state)

    (value, (logits, state)), token_grads = mg.value_and_grad(objective, has_aux=True)(w.params)
    grads.add(token_grads)
    w._state = state

    last = np.asarray(logits)[0, -1]  # (out_dims,)
    prediction = int(len(last) - 1 - np.argmax(last[::-1]))
    return float(value), prediction


# --------------------------------------------------------------------------------------------
# The optimiser


class RegionalAdamW:
    """An optimiser that applies summed token gradients to a RegionalWeights with modgrad.optim's AdamW.

    The default rule is AdamW (lr 3e-4, weight decay 0.01 on weights of rank >= 2) on gradients
    clipped to global norm ``grad_clip`` (default 1.0). The reference clips by scaling the learning
    rate and updates some tensor groups by SGD or not at all. Pass ``rule=ReferenceRegionalAdamW(...)``
    to reproduce that. Such a rule scales its learning rate by its own ``grad_clip``, which a
    ``grad_clip`` given here replaces.
    The ``with_*`` builders change a setting in place and return this optimiser.
    """

    def __init__(
        self,
        w: RegionalWeights,
        rule: AdamW | ReferenceRegionalAdamW | None = None,
        grad_clip: float | None = None,
    ):
        self.rule = AdamW(lr=3e-4, weight_decay=0.01) if rule is None else rule
        self.state = self.rule.init(w.params)
        self._paths = tree_paths(w.params)
        default_clip = self.rule.grad_clip if isinstance(self.rule, ReferenceRegionalAdamW) else 1.0
        self.with_clip(default_clip if grad_clip is None else grad_clip)
        self.grad_norm: float | None = None  # norm of the last step's gradients, before clipping

    @property
    def lr(self) -> float:
        return self.rule.lr

    @property
    def step_count(self) -> int:
        return int(self.state["step"])

    def with_lr(self, lr: float) -> "RegionalAdamW":
        self.rule = dataclasses.replace(self.rule, lr=lr)
        return self

    def with_wd(self, weight_decay: float) -> "RegionalAdamW":
        self.rule = dataclasses.replace(self.rule, weight_decay=weight_decay)
        return self

    def with_clip(self, grad_clip: float) -> "RegionalAdamW":
        if not grad_clip > 0:
            raise ValueError(f"grad_clip={grad_clip!r} is invalid: expected a positive global-norm limit")
        if isinstance(self.rule, ReferenceRegionalAdamW):
            self.rule = dataclasses.replace(self.rule, grad_clip=grad_clip)
        self.grad_clip = grad_clip
        return self

    def step(self, w: RegionalWeights, grads: RegionalGradients) -> None:
        """Update ``w.params`` with ``grads``, leaving the gradients as they are."""
        if tree_paths(w.params) != self._paths:
            raise ValueError(
                "these weights do not match the ones this optimiser was built for. "
                "Build one optimiser per RegionalWeights"
            )
        tree = grads.tree
        if isinstance(self.rule, ReferenceRegionalAdamW):
            self.grad_norm = float(global_norm(tree))
        else:
            tree, norm = clip_by_global_norm(tree, self.grad_clip)
            self.grad_norm = float(norm)
        if not np.isfinite(self.grad_norm):
            raise ValueError(
                f"gradient norm is {self.grad_norm}, so the weights were not updated. Lower the learning rate"
            )
        w.params, self.state = self.rule.update(w.params, tree, self.state)


__all__ = ["RegionalAdamW", "RegionalGradients", "RegionalWeights", "regional_train_token"]
