"""Early-exit inference of a single CTM, checked tick by tick against ctm_forward."""

import numpy as np
import pytest

from modgrad.ctm import CtmConfig, CtmWeights, ExitStrategy, ctm_infer, init_ctm
from modgrad.ctm.model import ctm_forward, encode_observation, exit_probabilities, init_state, run_ticks

BASE = CtmConfig(
    ticks=8, d_model=16, d_input=8, heads=2, n_synch_out=12, n_synch_action=6, synapse_depth=3,
    memory_length=4, deep_nlms=True, memory_hidden_dims=3, out_dims=5, min_width=4,
)
RAW = 7
# ctm_infer runs the same float32 ops as ctm_forward, one tick per call, so results agree to rounding.
RTOL, ATOL = 1e-5, 1e-6


def model(strategy: ExitStrategy):
    cfg = BASE.replace(exit_strategy=strategy)
    params, buffers = init_ctm(cfg, RAW)
    return cfg, params, buffers


def observations(batch: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, (batch, 3, RAW)).astype(np.float32)


def first_exceeding(values: np.ndarray, threshold: float) -> np.ndarray:
    """1-based index of the first entry > threshold along the last axis, or its length if none."""
    above = values > threshold
    return np.where(above.any(-1), above.argmax(-1) + 1, values.shape[-1])


def test_no_exit_matches_last_tick():
    cfg, params, buffers = model(ExitStrategy.none())
    obs = observations()
    preds, certs, _ = ctm_forward(params, buffers, cfg, obs)
    result = ctm_infer(params, buffers, cfg, obs)
    np.testing.assert_array_equal(result.ticks, np.full(len(obs), cfg.ticks))
    np.testing.assert_allclose(result.predictions, preds[:, -1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(result.certainties, certs[:, -1], rtol=RTOL, atol=ATOL)


def test_threshold_zero_exits_at_first_tick():
    cfg, params, buffers = model(ExitStrategy.certainty(0.0))
    obs = observations()
    preds, _, _ = ctm_forward(params, buffers, cfg, obs)
    result = ctm_infer(params, buffers, cfg, obs)
    np.testing.assert_array_equal(result.ticks, np.ones(len(obs), np.int64))
    np.testing.assert_allclose(result.predictions, preds[:, 0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("strategy", [ExitStrategy.certainty(1.5), ExitStrategy.adaptive_gate(0.1, 1.5)])
def test_impossible_threshold_runs_all_ticks(strategy):
    cfg, params, buffers = model(strategy)
    obs = observations()
    preds, _, _ = ctm_forward(params, buffers, cfg, obs)
    result = ctm_infer(params, buffers, cfg, obs)
    np.testing.assert_array_equal(result.ticks, np.full(len(obs), cfg.ticks))
    np.testing.assert_allclose(result.predictions, preds[:, -1], rtol=RTOL, atol=ATOL)


def test_certainty_batch_mixed_exit_ticks():
    cfg, params, buffers = model(ExitStrategy.none())
    obs = observations(batch=8)
    preds, certs, _ = ctm_forward(params, buffers, cfg, obs)
    confidence = certs[..., 1]  # (B, T)

    # The threshold whose exit ticks differ most across the batch.
    candidates = np.unique(confidence)
    threshold = max(candidates, key=lambda c: len(set(first_exceeding(confidence, c))))
    expected = first_exceeding(confidence, threshold)
    assert len(set(expected)) > 1, "no threshold gives mixed exit ticks for this batch"

    result = ctm_infer(params, buffers, cfg.replace(exit_strategy=ExitStrategy.certainty(float(threshold))), obs)
    np.testing.assert_array_equal(result.ticks, expected)
    rows = np.arange(len(obs))
    np.testing.assert_allclose(result.predictions, preds[rows, expected - 1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(result.certainties, certs[rows, expected - 1], rtol=RTOL, atol=ATOL)


def test_adaptive_gate_cumulative_halting():
    cfg, params, buffers = model(ExitStrategy.adaptive_gate(0.1, 0.99))
    obs = observations(batch=8)
    preds, _, _ = ctm_forward(params, buffers, cfg, obs)
    kv = encode_observation(params, obs)
    _, sync_out = run_ticks(params, buffers, cfg, kv, init_state(params, cfg, len(obs)))  # (T, B, So)
    lambdas = np.asarray(exit_probabilities(params, sync_out))[..., 0].T.astype(np.float64)  # (B, T)
    cdf = 1.0 - np.cumprod(1.0 - lambdas, -1)  # sum of lambda_t * survival equals 1 - product of (1 - lambda)

    candidates = np.unique(np.round(cdf, 4))
    threshold = max(candidates, key=lambda c: len(set(first_exceeding(cdf, c))))
    expected = first_exceeding(cdf, threshold)
    assert len(set(expected)) > 1, "no threshold gives mixed exit ticks for this batch"

    gated = cfg.replace(exit_strategy=ExitStrategy.adaptive_gate(0.1, float(threshold)))
    result = ctm_infer(params, buffers, gated, obs)
    np.testing.assert_array_equal(result.ticks, expected)
    np.testing.assert_allclose(result.predictions, preds[np.arange(len(obs)), expected - 1], rtol=RTOL, atol=ATOL)


def test_continues_from_given_state():
    cfg, params, buffers = model(ExitStrategy.none())
    obs = observations()
    _, _, state = ctm_forward(params, buffers, cfg, obs)
    preds, _, _ = ctm_forward(params, buffers, cfg, obs, state)
    result = ctm_infer(params, buffers, cfg, obs, state)
    np.testing.assert_allclose(result.predictions, preds[:, -1], rtol=RTOL, atol=ATOL)


def test_rejects_bad_observation_shape():
    cfg, params, buffers = model(ExitStrategy.none())
    with pytest.raises(ValueError, match=r"\(6, 7\)"):
        ctm_infer(params, buffers, cfg, observations()[:, 0])
    with pytest.raises(ValueError, match=r"\(6, 3, 4\)"):
        ctm_infer(params, buffers, cfg, observations()[..., :4])


def test_gate_strategy_needs_gate_params():
    cfg, params, buffers = model(ExitStrategy.none())
    gated = cfg.replace(exit_strategy=ExitStrategy.adaptive_gate(0.1))
    with pytest.raises(ValueError, match="exit_gate"):
        ctm_infer(params, buffers, gated, observations())


def test_ctm_weights_wraps_forward_and_infer():
    cfg = BASE.replace(exit_strategy=ExitStrategy.certainty(0.0))
    w = CtmWeights(cfg, RAW)
    obs = observations()
    preds, certs = w.forward(obs)
    expected, expected_certs, _ = ctm_forward(w.params, w.buffers, cfg, obs)
    assert preds.shape == (len(obs), cfg.ticks, cfg.out_dims)
    assert certs.shape == (len(obs), cfg.ticks, 2)
    np.testing.assert_array_equal(preds, expected)
    np.testing.assert_array_equal(certs, expected_certs)
    np.testing.assert_array_equal(w.infer(obs).ticks, np.ones(len(obs), np.int64))
