"""Losses over a CTM's per-tick predictions.

A CTM makes one prediction per internal tick, so every loss here reads predictions (B, T, C) and
integer targets (B,) and reduces to one scalar, averaged over the batch. The losses are written
with ``modgrad.ops`` and get their gradients from the engine, so they run eagerly, traced or compiled.

Tick choices (the minimum-loss tick, the most certain tick) are made on values behind a stop-gradient
and turned into one-hot masks, so gradient flows only through the cross-entropy of the chosen ticks.
The masks are built from comparisons and a triangular matmul rather than from argmax, so ties resolve
the same way on every device: the first minimum, the last maximum.

Cross-entropy is the exact ``-log_softmax(z)[y]``. The reference clamps the probability at 1e-8
(so its loss saturates at 18.4 nats), which only differs for predictions that are already hopeless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from modgrad import ops
from modgrad.ctm.model import certainty as certainty_of

__all__ = [
    "AdaptiveExitLoss",
    "CtmLoss",
    "ImaginationLoss",
    "LastTickCE",
    "StepwiseCE",
    "ThinkingLoss",
    "cross_entropy",
    "first_min_mask",
    "last_max_mask",
    "make_loss",
    "LOSSES",
]


def cross_entropy(logits, targets):
    """Per-example cross-entropy in nats. logits (..., C), integer targets (...) -> (...)."""
    n_classes = ops.shape_of(logits)[-1]
    onehot = ops.one_hot(targets, n_classes, ops.dtype_of(logits))  # (..., C)
    return -ops.sum(ops.log_softmax(logits, -1) * onehot, -1)


def tick_cross_entropy(preds, targets):
    """Cross-entropy of every tick. preds (B, T, C), targets (B,) -> (B, T)."""
    return cross_entropy(preds, ops.expand_dims(targets, 1))


def _exclusive_count(mask, before: bool):
    """For each t, the number of set entries strictly before t (or strictly after t) on the last axis."""
    ticks = ops.shape_of(mask)[-1]
    order = np.triu(np.ones((ticks, ticks)), k=1) if before else np.tril(np.ones((ticks, ticks)), k=-1)
    return ops.matmul(mask, order.astype(ops.dtype_of(mask)))  # (B, T)


def first_min_mask(x):
    """One-hot mask of the first minimum along the last axis of x (..., T); no gradient flows through it."""
    x = ops.stop_gradient(x)
    is_min = ops.cast(ops.equal(x, ops.min(x, -1, keepdims=True)), ops.dtype_of(x))
    return is_min * ops.cast(ops.equal(_exclusive_count(is_min, before=True), 0.0), ops.dtype_of(x))


def last_max_mask(x):
    """One-hot mask of the last maximum along the last axis of x (..., T); no gradient flows through it."""
    x = ops.stop_gradient(x)
    is_max = ops.cast(ops.equal(x, ops.max(x, -1, keepdims=True)), ops.dtype_of(x))
    return is_max * ops.cast(ops.equal(_exclusive_count(is_max, before=False), 0.0), ops.dtype_of(x))


def _confidence(preds, certainties):
    """1 - normalised entropy per tick (B, T), from the given certainties or from preds."""
    if certainties is None:
        certainties = certainty_of(preds)
    return certainties[..., 1]


def _ctm_per_example(ce, confidence):
    """(CE at the first min-CE tick + CE at the last most-certain tick) / 2. ce, confidence (B, T) -> (B,)."""
    picked = first_min_mask(ce) + last_max_mask(confidence)  # (B, T); 2 where both pick the same tick
    return 0.5 * ops.sum(ce * picked, -1)


# --------------------------------------------------------------------------------------------
# Losses


@dataclass(frozen=True)
class CtmLoss:
    """The CTM loss: mean of the cross-entropy at the min-loss tick and at the most certain tick."""

    def per_example(self, preds, targets, certainties=None):
        ce = tick_cross_entropy(preds, targets)  # (B, T)
        return _ctm_per_example(ce, _confidence(preds, certainties))

    def __call__(self, preds, targets, certainties=None):
        return ops.mean(self.per_example(preds, targets, certainties))


@dataclass(frozen=True)
class LastTickCE:
    """Cross-entropy of the last tick only."""

    def per_example(self, preds, targets, certainties=None):
        return cross_entropy(preds[:, -1], targets)

    def __call__(self, preds, targets, certainties=None):
        return ops.mean(self.per_example(preds, targets, certainties))


@dataclass(frozen=True)
class ImaginationLoss:
    """CtmLoss over the committed ticks c..T-1 only, minus a bonus for improving over tick 0.

    c = min(ceil(T * ratio), T - 1). The bonus ``bonus * max(0, CE_0 - CE_c)`` is subtracted from the
    value but carries no gradient, so the early "imagination" ticks are free to explore.
    """

    ratio: float = 0.5
    bonus: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ImaginationLoss ratio must be in [0, 1], got {self.ratio}")

    def commit_tick(self, ticks: int) -> int:
        return min(math.ceil(ticks * self.ratio), ticks - 1)

    def per_example(self, preds, targets, certainties=None):
        ticks = ops.shape_of(preds)[1]
        c = self.commit_tick(ticks)
        ce = tick_cross_entropy(preds, targets)  # (B, T)
        loss = _ctm_per_example(ce[:, c:], _confidence(preds, certainties)[:, c:])
        if c > 0:
            improvement = ops.stop_gradient(ce[:, 0] - ce[:, c])
            loss = loss - self.bonus * ops.relu(improvement)
        return loss

    def __call__(self, preds, targets, certainties=None):
        return ops.mean(self.per_example(preds, targets, certainties))


@dataclass(frozen=True)
class ThinkingLoss:
    """CtmLoss plus a hinge penalty on every tick that lowers the previous tick's loss by less than ``margin``.

    L = CtmLoss + alpha * mean_{t>=1} max(0, margin - (CE_{t-1} - CE_t)). The gradient is the exact
    one of this formula: the reference scales the CE_{t-1} side by an extra 0.5.
    """

    alpha: float = 0.1
    margin: float = 0.01

    def per_example(self, preds, targets, certainties=None):
        ce = tick_cross_entropy(preds, targets)  # (B, T)
        loss = _ctm_per_example(ce, _confidence(preds, certainties))
        if ops.shape_of(preds)[1] > 1:
            stall = ops.relu(self.margin - (ce[:, :-1] - ce[:, 1:]))  # (B, T-1)
            loss = loss + self.alpha * ops.mean(stall, -1)
        return loss

    def __call__(self, preds, targets, certainties=None):
        return ops.mean(self.per_example(preds, targets, certainties))


@dataclass(frozen=True)
class StepwiseCE:
    """Route loss for mazes: one n_classes-way choice per route position, with a curriculum.

    preds (B, T, P * n_classes) contain P positions of n_classes logits each, and targets are (B, P).
    The loss of a tick is the mean CE over positions. t_min is the first tick of minimal loss, and
    t_cert the last tick of maximal certainty (computed over the whole flat vector). Only positions p < U are trained, where
    U = min(prefix + lookahead, P) and prefix counts the leading positions predicted correctly at
    t_min (argmax with ties to the last class). L = (mean_{p<U} CE[t_min, p] + mean_{p<U} CE[t_cert, p]) / 2.
    """

    n_classes: int = 5
    lookahead: int = 5

    def __post_init__(self):
        if self.n_classes < 1 or self.lookahead < 0:
            raise ValueError(f"StepwiseCE needs n_classes >= 1 and lookahead >= 0, got {self.n_classes}, {self.lookahead}")

    def per_example(self, preds, targets, certainties=None):
        batch, ticks, flat = ops.shape_of(preds)
        if flat % self.n_classes:
            raise ValueError(f"prediction width {flat} is not a multiple of n_classes={self.n_classes}")
        positions = flat // self.n_classes
        if ops.shape_of(targets)[-1] != positions:
            raise ValueError(f"targets have {ops.shape_of(targets)[-1]} positions, predictions have {positions}")
        dtype = ops.dtype_of(preds)
        logits = ops.reshape(preds, (batch, ticks, positions, self.n_classes))  # (B, T, P, n)
        ce = cross_entropy(logits, ops.expand_dims(targets, 1))  # (B, T, P)
        t_min = first_min_mask(ops.mean(ce, -1))  # (B, T)
        t_cert = last_max_mask(_confidence(preds, certainties))  # (B, T)

        # Correct prefix at t_min: count positions before which no position was wrong.
        at_min = ops.sum(ops.stop_gradient(logits) * ops.reshape(t_min, (batch, ticks, 1, 1)), 1)  # (B, P, n)
        best = last_max_mask(at_min)  # (B, P, n) one-hot of the predicted class
        wrong = 1.0 - ops.sum(best * ops.one_hot(targets, self.n_classes, dtype), -1)  # (B, P)
        wrong_so_far = ops.matmul(wrong, np.triu(np.ones((positions, positions), dtype)))  # (B, P), inclusive
        prefix = ops.sum(ops.cast(ops.equal(wrong_so_far, 0.0), dtype), -1, keepdims=True)  # (B, 1)
        horizon = ops.minimum(prefix + float(self.lookahead), float(positions))  # (B, 1)
        trained = ops.cast(ops.greater(horizon, np.arange(positions, dtype=dtype)), dtype)  # (B, P)

        per_tick = ops.sum(ce * ops.expand_dims(trained, 1), -1) / ops.maximum(horizon, 1.0)  # (B, T)
        return 0.5 * ops.sum(per_tick * (t_min + t_cert), -1)

    def __call__(self, preds, targets, certainties=None):
        return ops.mean(self.per_example(preds, targets, certainties))


@dataclass(frozen=True)
class AdaptiveExitLoss:
    """Loss that trains an exit gate: expected CE under the halting distribution minus beta * entropy.

    lambdas (B, T) are the gate's halting probabilities per tick. S_0 = 1, S_t = S_{t-1} (1 - lambda_{t-1});
    p_t = lambda_t S_t for t < T-1 and p_{T-1} = S_{T-1}. L = sum_t p_t CE_t - beta * H(p), with the CE
    behind a stop-gradient so only the gate learns from it. The gradient is the exact one: the
    reference flips the sign of the entropy term in its hand-written gradient.
    """

    beta: float = 0.1

    def per_example(self, lambdas, preds, targets):
        if len(ops.shape_of(lambdas)) == 3:
            lambdas = ops.squeeze(lambdas, -1)
        ticks = ops.shape_of(lambdas)[1]
        ce = ops.stop_gradient(tick_cross_entropy(preds, targets))  # (B, T)
        survive = lambdas[:, 0] * 0.0 + 1.0  # (B,)
        halting = []
        for t in range(ticks):
            if t == ticks - 1:
                halting.append(survive)
            else:
                halting.append(lambdas[:, t] * survive)
                survive = survive * (1.0 - lambdas[:, t])
        p = ops.stack(halting, 1)  # (B, T)
        entropy = -ops.sum(p * ops.log(ops.maximum(p, 1e-10)), -1)
        return ops.sum(p * ce, -1) - self.beta * entropy

    def __call__(self, lambdas, preds, targets):
        return ops.mean(self.per_example(lambdas, preds, targets))


LOSSES = {
    "ctm": CtmLoss,
    "last": LastTickCE,
    "imagination": ImaginationLoss,
    "thinking": ThinkingLoss,
}


def make_loss(name: str):
    """Build a per-tick loss by name: one of LOSSES."""
    try:
        return LOSSES[name]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}") from None
