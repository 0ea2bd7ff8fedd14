"""Running a single CTM: inference that stops each example early, and a CtmWeights wrapper.

``ctm_infer`` runs the ticks of ``ctm_forward`` one at a time and stops an example once its
exit rule (``CtmConfig.exit_strategy``) fires, so easy inputs use fewer ticks. It runs eagerly
only. Compiled programs use ``ctm_forward``, which always runs every tick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modgrad import ops
from modgrad.ctm.config import CtmConfig
from modgrad.ctm.model import (
    certainty,
    ctm_forward,
    encode_observation,
    exit_probabilities,
    init_state,
    linear,
    run_ticks,
)
from modgrad.ctm.weights import init_ctm


@dataclass(frozen=True)
class ExitResult:
    """Each example's prediction and certainty at its exit tick, as ``ctm_infer`` returns them.

    predictions (B, O). certainties (B, 2), as [normalised entropy, 1 - normalised entropy].
    ticks (B,) int64, the ticks run up to and including the exit tick, from 1 to cfg.ticks.
    """

    predictions: np.ndarray
    certainties: np.ndarray
    ticks: np.ndarray


def _check_observation(params: dict, obs) -> None:
    if not isinstance(obs, np.ndarray):
        raise TypeError(
            f"ctm_infer runs eagerly on numpy arrays, got {type(obs).__name__}. "
            "Under mg.compile use ctm_forward, which always runs every tick"
        )
    raw = ops.shape_of(params["kv_proj"]["w"])[0]
    if obs.ndim != 3 or obs.shape[-1] != raw:
        raise ValueError(f"observation shape {obs.shape} is not (B, n_tokens, {raw}). Pass a batch of token sets")


def ctm_infer(params: dict, buffers: dict, cfg: CtmConfig, obs, state: dict | None = None) -> ExitResult:
    """Run ticks one at a time on obs (B, n, raw) and stop each example by ``cfg.exit_strategy``.

    "none": every example runs all cfg.ticks ticks. "certainty": an example stops after the first
    tick whose certainty 1 - normalised entropy exceeds the threshold. "adaptive_gate": with
    lambda_t = sigmoid(exit_gate(sync_out_t)), cdf += lambda_t * survive and survive *= 1 - lambda_t,
    and the example stops once cdf exceeds the threshold. Both rules are strict comparisons, as in
    the reference. Every example stops at the last tick at the latest, and the loop ends when all
    have stopped.

    The ticks are those of ``ctm_forward``, so an example's prediction equals ctm_forward's
    prediction at its exit tick. Examples of a batch do not interact: one that has stopped keeps
    ticking until the whole batch has stopped, but its result is taken at its own exit tick.
    state: the state to continue from, as ``ctm_forward`` returns it (default: the start state).
    Eager only, because the stop decision reads values on the host.
    """
    _check_observation(params, obs)
    strategy = cfg.exit_strategy
    if strategy.kind == "adaptive_gate" and "exit_gate" not in params:
        raise ValueError(
            "exit strategy 'adaptive_gate' needs params['exit_gate'], which is missing. "
            "Build params with init_ctm for this config"
        )

    batch = obs.shape[0]
    if state is None:
        state = init_state(params, cfg, batch)
    kv = encode_observation(params, obs)
    one_tick = cfg.replace(ticks=1)

    predictions = certainties = None
    ticks = np.zeros(batch, np.int64)  # 0 while an example is still running
    cdf, survive = 0.0, 1.0
    for t in range(cfg.ticks):
        state, sync_out = run_ticks(params, buffers, one_tick, kv, state)  # sync_out (1, B, So)
        pred = linear(params["output_proj"], sync_out[0])  # (B, O)
        cert = certainty(pred)  # (B, 2)

        if strategy.kind == "certainty":
            stop = np.asarray(cert)[:, 1] > strategy.threshold
        elif strategy.kind == "adaptive_gate":
            halting = exit_probabilities(params, sync_out[0])[:, 0]  # (B,)
            cdf = cdf + halting * survive
            survive = survive * (1.0 - halting)
            stop = np.asarray(cdf) > strategy.threshold
        else:
            stop = np.zeros(batch, bool)

        if predictions is None:
            predictions, certainties = np.array(pred), np.array(cert)
        exiting = (ticks == 0) & (stop | (t == cfg.ticks - 1))
        predictions[exiting] = np.asarray(pred)[exiting]
        certainties[exiting] = np.asarray(cert)[exiting]
        ticks[exiting] = t + 1
        if (ticks > 0).all():
            break
    return ExitResult(predictions=predictions, certainties=certainties, ticks=ticks)


class CtmWeights:
    """A single CTM: its config, parameters and sync-pair buffers (``init_ctm``), with forward and inference.

    raw_input_dim: width of the observation tokens (defaults to cfg.d_input).
    """

    def __init__(self, cfg: CtmConfig, raw_input_dim: int | None = None, seed: int = 42):
        self.cfg = cfg
        self.params, self.buffers = init_ctm(cfg, raw_input_dim, seed=seed)

    def forward(self, obs):
        """Run every tick from the start state on obs (B, n, raw) -> (predictions (B, T, O), certainties (B, T, 2)).

        Use ``ctm_forward`` to carry the state from one call to the next.
        """
        preds, certs, _ = ctm_forward(self.params, self.buffers, self.cfg, obs)
        return preds, certs

    def infer(self, obs) -> ExitResult:
        """Run ticks until each example's exit rule fires (see ``ctm_infer``)."""
        return ctm_infer(self.params, self.buffers, self.cfg, obs)


__all__ = ["CtmWeights", "ExitResult", "ctm_infer"]
