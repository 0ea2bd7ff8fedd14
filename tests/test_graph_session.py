"""Per-token brain training: the quick-start loop, gradient sums, optimiser steps and carried state."""

import numpy as np
import pytest

from modgrad.ctm.config import CtmConfig, ExitStrategy
from modgrad.engine.pytree import tree_flatten, tree_map
from modgrad.graph import (
    Connection,
    RegionalAdamW,
    RegionalConfig,
    RegionalGradients,
    RegionalWeights,
    brain_forward_tokens,
    init_brain_state,
    regional_train_token,
)
from modgrad.losses import LastTickCE
from modgrad.optim import ReferenceRegionalAdamW, tree_paths

NO_EXIT = ExitStrategy.none()
# Sums of float32 gradients in a different order agree to a few ulps of the largest term.
RTOL32, ATOL32 = 1e-5, 1e-6


def tiny_config(outer_ticks: int = 2) -> RegionalConfig:
    """Two 8-neuron regions in a loop, where the first also reads the observation."""
    regions = (
        CtmConfig.region("input", 8, 8, 3, False, 1, NO_EXIT),
        CtmConfig.region("output", 8, 8, 3, True, 1, NO_EXIT),
    )
    return RegionalConfig(
        regions=regions,
        region_names=("input", "output"),
        connections=(Connection((1,), 0, receives_observation=True), Connection((0,), 1)),
        outer_ticks=outer_ticks,
        n_global_sync=12,
        out_dims=4,
        raw_obs_dim=6,
        exit_strategy=NO_EXIT,
        extra_heads=False,
        name="tiny",
    )


def copy_tree(tree):
    return tree_map(lambda x: np.array(x, copy=True), tree)


def assert_trees_close(actual, expected, rtol=RTOL32, atol=ATOL32):
    for path, a, b in zip(tree_paths(expected), tree_flatten(actual)[0], tree_flatten(expected)[0]):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=path)


def max_abs(tree) -> float:
    return max(float(np.abs(leaf).max()) for leaf in tree_flatten(tree)[0])


def test_quick_start_loop_learns_sequence():
    cfg = tiny_config()
    w = RegionalWeights(cfg)
    opt = RegionalAdamW(w).with_lr(1e-2)
    grads = RegionalGradients.zeros(w)
    sequence = [0, 1, 2, 3] * 40
    losses = []
    for token, target in zip(sequence[:-1], sequence[1:]):
        loss, pred = regional_train_token(w, grads, token, target)
        opt.step(w, grads)
        grads.zero()
        losses.append(loss)
        assert 0 <= pred < cfg.out_dims
    first, last = np.mean(losses[:12]), np.mean(losses[-12:])
    assert last < 0.5 * first, f"loss went from {first:.3f} to {last:.3f}"


def test_quick_start_eight_region_small_runs():
    cfg = RegionalConfig.eight_region_small(obs_dim=16, out_dims=32, ticks=1)
    w = RegionalWeights(cfg)
    opt = RegionalAdamW(w).with_lr(3e-4)
    grads = RegionalGradients.zeros(w)
    for token, target in [(1, 2), (2, 3)]:
        loss, pred = regional_train_token(w, grads, token, target)
        opt.step(w, grads)
        grads.zero()
        assert np.isfinite(loss)
        assert 0 <= pred < cfg.out_dims
    assert opt.step_count == 2


def test_gradients_accumulate_over_calls():
    cfg = tiny_config()
    w = RegionalWeights(cfg)
    grads = RegionalGradients.zeros(w)
    regional_train_token(w, grads, 1, 2)
    first = copy_tree(grads.tree)
    grads.zero()
    regional_train_token(w, grads, 2, 3)
    second = copy_tree(grads.tree)

    w = RegionalWeights(cfg)
    grads = RegionalGradients.zeros(w)
    regional_train_token(w, grads, 1, 2)
    regional_train_token(w, grads, 2, 3)
    assert max_abs(first) > 0
    assert max_abs(second) > 0
    assert_trees_close(grads.tree, tree_map(lambda a, b: a + b, first, second))


def test_zero_clears_every_gradient():
    w = RegionalWeights(tiny_config())
    grads = RegionalGradients.zeros(w)
    regional_train_token(w, grads, 0, 1)
    assert grads.norm() > 0
    grads.zero()
    assert max_abs(grads.tree) == 0.0
    assert tree_paths(grads.tree) == tree_paths(w.params)


def test_step_changes_weights_not_gradients():
    w = RegionalWeights(tiny_config())
    opt = RegionalAdamW(w)
    grads = RegionalGradients.zeros(w)
    regional_train_token(w, grads, 0, 1)
    before, grads_before = copy_tree(w.params), copy_tree(grads.tree)
    opt.step(w, grads)
    changed = [not np.array_equal(a, b) for a, b in zip(tree_flatten(w.params)[0], tree_flatten(before)[0])]
    assert any(changed)
    assert not np.array_equal(w.params["output_proj"]["w"], before["output_proj"]["w"])
    assert_trees_close(grads.tree, grads_before, rtol=0, atol=0)
    assert opt.step_count == 1
    assert opt.grad_norm == pytest.approx(grads.norm(), rel=1e-6)


def test_builders_set_hyperparameters():
    w = RegionalWeights(tiny_config())
    opt = RegionalAdamW(w).with_lr(1e-3).with_wd(0.0).with_clip(5.0)
    assert opt.lr == 1e-3
    assert opt.rule.weight_decay == 0.0
    assert opt.grad_clip == 5.0
    with pytest.raises(ValueError, match="-1"):
        opt.with_lr(-1.0)
    with pytest.raises(ValueError, match="0.0"):
        opt.with_clip(0.0)


def test_reference_rule_freezes_group():
    w = RegionalWeights(tiny_config())
    def group(path, array):
        return "frozen" if path.startswith("edges") else "adamw"

    rule = ReferenceRegionalAdamW(group=group, grad_clip=3.0)
    opt = RegionalAdamW(w, rule=rule)
    assert opt.grad_clip == 3.0
    grads = RegionalGradients.zeros(w)
    regional_train_token(w, grads, 0, 1)
    before = copy_tree(w.params)
    opt.step(w, grads)
    np.testing.assert_array_equal(w.params["edges"][0]["w"], before["edges"][0]["w"])
    assert not np.array_equal(w.params["output_proj"]["w"], before["output_proj"]["w"])


def test_state_carries_like_window_forward():
    cfg = tiny_config()
    w = RegionalWeights(cfg)
    grads = RegionalGradients.zeros(w)
    tokens = [3, 0, 2]
    for token in tokens:
        regional_train_token(w, grads, token, 0)
    _, expected = brain_forward_tokens(w.params, w.buffers, cfg, np.asarray([tokens], np.int64))
    assert_trees_close(w.state, expected)


def test_reset_state_restores_start_state():
    cfg = tiny_config()
    w = RegionalWeights(cfg)
    grads = RegionalGradients.zeros(w)
    first_loss, _ = regional_train_token(w, grads, 1, 2)
    start = init_brain_state(w.params, cfg, 1)
    assert max_abs(tree_map(lambda a, b: a - b, w.state, start)) > 0

    w.reset_state()
    assert_trees_close(w.state, start, rtol=0, atol=0)
    again, _ = regional_train_token(w, grads, 1, 2)
    assert again == first_loss


def test_gradient_stops_at_carried_state():
    w = RegionalWeights(tiny_config())
    grads = RegionalGradients.zeros(w)
    regional_train_token(w, grads, 1, 2)
    assert np.abs(grads.tree["regions"][0]["start_activated"]).max() > 0
    grads.zero()
    regional_train_token(w, grads, 2, 3)
    assert np.abs(grads.tree["regions"][0]["start_activated"]).max() == 0.0
    assert np.abs(grads.tree["regions"][0]["start_trace"]).max() == 0.0


def test_embedding_gradient_matches_finite_difference():
    # float64 weights, and a loss without ImaginationLoss's gradient-free bonus term.
    cfg = tiny_config()
    start = RegionalWeights(cfg)
    params = tree_map(lambda x: np.asarray(x, np.float64), start.params)
    w = RegionalWeights.from_arrays(cfg, params, start.buffers)
    grads = RegionalGradients.zeros(w)
    regional_train_token(w, grads, 2, 1, loss=LastTickCE())
    analytic = grads.tree["embeddings"]
    assert np.abs(analytic[[0, 1, 3]]).max() == 0.0  # only the fed token's row

    def loss_at(table):
        probe = RegionalWeights.from_arrays(cfg, {**params, "embeddings": table}, start.buffers)
        return regional_train_token(probe, RegionalGradients.zeros(probe), 2, 1, loss=LastTickCE())[0]

    eps = 1e-6
    for j in range(cfg.raw_obs_dim):
        up, down = params["embeddings"].copy(), params["embeddings"].copy()
        up[2, j] += eps
        down[2, j] -= eps
        numeric = (loss_at(up) - loss_at(down)) / (2 * eps)
        assert analytic[2, j] == pytest.approx(numeric, rel=1e-4, abs=1e-7), f"embeddings[2, {j}]"


def test_float_observation_leaves_embeddings_untouched():
    cfg = tiny_config()
    w = RegionalWeights(cfg)
    grads = RegionalGradients.zeros(w)
    obs = np.linspace(-1.0, 1.0, cfg.raw_obs_dim)
    loss, _ = regional_train_token(w, grads, obs, 3)
    assert np.isfinite(loss)
    assert np.abs(grads.tree["embeddings"]).max() == 0.0
    assert np.abs(grads.tree["output_proj"]["w"]).max() > 0


def test_rejects_bad_inputs():
    cfg = tiny_config()
    w = RegionalWeights(cfg)
    grads = RegionalGradients.zeros(w)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        regional_train_token(w, grads, np.zeros(5, np.float32), 0)
    with pytest.raises(ValueError, match="token id 9"):
        regional_train_token(w, grads, 9, 0)
    with pytest.raises(ValueError, match="token id -1"):
        regional_train_token(w, grads, -1, 0)
    with pytest.raises(ValueError, match="target 4"):
        regional_train_token(w, grads, 0, 4)
    with pytest.raises(ValueError, match="target 1.5"):
        regional_train_token(w, grads, 0, 1.5)
    with pytest.raises(ValueError, match="int64"):
        regional_train_token(w, grads, np.zeros(6, np.int64), 0)
    assert max_abs(grads.tree) == 0.0  # rejected calls add nothing
    assert w._state is None  # and leave the state alone


def test_step_rejects_other_weights():
    opt = RegionalAdamW(RegionalWeights(tiny_config()))
    other = RegionalWeights(tiny_config(outer_ticks=1).replace(extra_heads=True))
    with pytest.raises(ValueError, match="do not match"):
        opt.step(other, RegionalGradients.zeros(other))


def test_spatial_brain_takes_token_sets():
    cfg = tiny_config().replace(spatial_tokens=4, spatial_regions=(1,))
    w = RegionalWeights(cfg)
    grads = RegionalGradients.zeros(w)
    loss, _ = regional_train_token(w, grads, np.ones((4, cfg.raw_obs_dim), np.float32), 1)
    assert np.isfinite(loss)
    with pytest.raises(ValueError, match="token id 1"):
        regional_train_token(w, grads, 1, 1)
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        regional_train_token(w, grads, np.ones((3, cfg.raw_obs_dim), np.float32), 1)
