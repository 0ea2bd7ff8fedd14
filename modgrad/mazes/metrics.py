"""Route metrics and auto-curriculum bookkeeping for the maze benchmark.

All functions take a batch of predicted moves and target moves, both (B, L) action ids, where
L is the route length (20). Turn flat logits (B, L·5) into moves with `moves_from_logits`, which
breaks ties towards the last maximal class as the reference's argmax does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modgrad.mazes.generate import N_ACTIONS


def argmax_last(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Return the index of the maximum along `axis`, taking the last one on ties.

    Raises ValueError on NaN, which the reference's comparison would reject as well.
    """
    x = np.asarray(x)
    if np.isnan(x).any():
        raise ValueError("argmax over logits that contain NaN: check the model output for divergence")
    flipped = np.flip(x, axis=axis)
    return x.shape[axis] - 1 - np.argmax(flipped, axis=axis)


def moves_from_logits(logits: np.ndarray, n_classes: int = N_ACTIONS) -> np.ndarray:
    """Convert flat logits (..., L·n_classes) to moves (..., L). Position p reads `[n·p : n·p + n]`."""
    logits = np.asarray(logits)
    if logits.shape[-1] % n_classes:
        raise ValueError(f"last logits dimension {logits.shape[-1]} is not a multiple of {n_classes} classes")
    per_position = logits.reshape(*logits.shape[:-1], logits.shape[-1] // n_classes, n_classes)
    return argmax_last(per_position, axis=-1)


def _check_moves(predicted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.ndim != 2 or predicted.shape != target.shape:
        raise ValueError(f"predicted and target moves must both be (B, L), got {predicted.shape} and {target.shape}")
    if predicted.shape[0] == 0 or predicted.shape[1] == 0:
        raise ValueError(f"metrics need at least one maze and one position, got shape {predicted.shape}")
    return predicted, target


def _scored_positions(shape: tuple[int, int], path_lengths: np.ndarray | None) -> np.ndarray:
    """Return a (B, L) mask of positions p < min(L, path_length); all positions when lengths are None."""
    batch, route_len = shape
    if path_lengths is None:
        return np.ones(shape, dtype=bool)
    path_lengths = np.asarray(path_lengths)
    if path_lengths.shape != (batch,):
        raise ValueError(f"path_lengths must have shape ({batch},), got {path_lengths.shape}")
    return np.arange(route_len)[None, :] < np.minimum(path_lengths, route_len)[:, None]


def first_step_accuracy(predicted: np.ndarray, target: np.ndarray) -> float:
    """Return the fraction of mazes whose first predicted move equals the first route move."""
    predicted, target = _check_moves(predicted, target)
    return float(np.mean(predicted[:, 0] == target[:, 0]))


def per_step_accuracy(predicted: np.ndarray, target: np.ndarray, path_lengths: np.ndarray | None = None) -> float:
    """Return correct positions over scored positions, pooled over the batch.

    A maze scores positions p < min(L, path_length), so WAIT padding of short routes is not
    counted. Without `path_lengths` every position is scored, which equals the reference at
    size 21 because every route there is longer than 20.
    """
    predicted, target = _check_moves(predicted, target)
    scored = _scored_positions(predicted.shape, path_lengths)
    total = int(scored.sum())
    if total == 0:
        return 0.0
    return float(((predicted == target) & scored).sum() / total)


def prefix_lengths(predicted: np.ndarray, target: np.ndarray, path_lengths: np.ndarray | None = None) -> np.ndarray:
    """Return per maze the number of leading scored positions that are all correct, (B,) int64."""
    predicted, target = _check_moves(predicted, target)
    correct = (predicted == target) & _scored_positions(predicted.shape, path_lengths)
    # cumprod stays 1 while every position so far is correct and drops to 0 at the first miss.
    return np.cumprod(correct, axis=1).sum(axis=1).astype(np.int64)


def correct_prefix_length(predicted: np.ndarray, target: np.ndarray, path_lengths: np.ndarray | None = None) -> float:
    """Return the mean over mazes of the correct prefix length (0 to L)."""
    return float(prefix_lengths(predicted, target, path_lengths).mean())


@dataclass(frozen=True)
class RouteScores:
    """The benchmark's three evaluation numbers over `n_mazes` mazes."""

    first_step: float  # fraction in [0, 1]
    per_step: float  # fraction in [0, 1]
    correct_prefix: float  # mean leading correct moves, 0 to L
    n_mazes: int


def score_routes(predicted: np.ndarray, target: np.ndarray, path_lengths: np.ndarray | None = None) -> RouteScores:
    """Compute first-step accuracy, per-step accuracy and mean correct prefix in one call."""
    predicted, target = _check_moves(predicted, target)
    return RouteScores(
        first_step=first_step_accuracy(predicted, target),
        per_step=per_step_accuracy(predicted, target, path_lengths),
        correct_prefix=correct_prefix_length(predicted, target, path_lengths),
        n_mazes=predicted.shape[0],
    )


# ----------------------------------------------------------------------------------------------
# auto-curriculum bookkeeping (the step-wise CE loss trains positions < prefix + lookahead)


def select_loss_ticks(tick_losses: np.ndarray, certainty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pick the two ticks that receive gradient, per maze.

    tick_losses (B, K) is the mean CE over all L positions at each tick and certainty (B, K)
    is 1 - normalised entropy. Returns `t_min`, the first tick of minimal loss, and `t_cert`,
    the last tick of maximal certainty, both (B,) int64.
    """
    tick_losses, certainty = np.asarray(tick_losses), np.asarray(certainty)
    if tick_losses.ndim != 2 or tick_losses.shape != certainty.shape:
        raise ValueError(f"tick_losses and certainty must both be (B, K), got {tick_losses.shape} and {certainty.shape}")
    if np.isnan(tick_losses).any():
        raise ValueError("tick_losses contain NaN: check the model output for divergence")
    t_min = np.argmin(tick_losses, axis=1).astype(np.int64)  # numpy returns the first minimum
    t_cert = argmax_last(certainty, axis=1).astype(np.int64)
    return t_min, t_cert


def curriculum_horizon(predicted: np.ndarray, target: np.ndarray, lookahead: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Return the correct prefix P and the trained horizon U = min(P + lookahead, L), both (B,).

    `predicted` are the argmax moves at tick `t_min`. Unlike the evaluation prefix, every one of
    the L positions counts here, WAIT padding included, as in the reference loss. U is 0 only
    when lookahead is 0 and the first move is wrong; the reference loss then divides by max(U, 1).
    """
    if lookahead < 0:
        raise ValueError(f"lookahead must be non-negative, got {lookahead}")
    prefix = prefix_lengths(predicted, target)
    horizon = np.minimum(prefix + lookahead, np.asarray(target).shape[1])
    return prefix, horizon


def curriculum_mask(horizon: np.ndarray, route_len: int) -> np.ndarray:
    """Return the (B, route_len) bool mask of trained positions p < U."""
    return np.arange(route_len)[None, :] < np.asarray(horizon)[:, None]
