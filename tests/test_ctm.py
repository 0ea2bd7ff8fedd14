"""The single CTM: reference parameter counts, gradients vs torch autograd and finite differences."""

import numpy as np
import pytest
import torch

import modgrad as mg
from modgrad import ops
from modgrad.ctm import CtmConfig, ExitStrategy, count_params, init_ctm
from modgrad.ctm.model import ctm_forward, init_state, run_ticks, encode_observation
from modgrad.engine.pytree import tree_flatten, tree_map, tree_unflatten
from modgrad.testing import torch_ctm

SMALL = CtmConfig(
    ticks=5, d_model=16, d_input=8, heads=2, n_synch_out=12, n_synch_action=6, synapse_depth=3,
    memory_length=4, deep_nlms=True, memory_hidden_dims=3, out_dims=5, min_width=4, n_random_pairing_self=2,
)


def maze_config(gate: bool = True) -> CtmConfig:
    return CtmConfig(
        ticks=16, d_model=256, d_input=128, heads=4, n_synch_out=256, n_synch_action=256, synapse_depth=4,
        memory_length=16, deep_nlms=True, memory_hidden_dims=8, out_dims=100, min_width=16,
        exit_strategy=ExitStrategy.adaptive_gate(0.1) if gate else ExitStrategy.none(),
    )


def as_float64(tree):
    return tree_map(lambda a: np.asarray(a, np.float64), tree)


def ce_loss(buffers, cfg, obs, targets):
    def loss(params):
        preds, _, _ = ctm_forward(params, buffers, cfg, obs)
        logp = ops.log_softmax(preds, -1)
        return -ops.mean(ops.sum(logp * ops.expand_dims(ops.one_hot(targets, cfg.out_dims, logp.dtype), 1), -1))

    return loss


def test_maze_ctm_param_count():
    assert count_params(init_ctm(maze_config(), 128)[0]) == 450_325
    assert count_params(init_ctm(maze_config(gate=False), 128)[0]) == 450_068


@pytest.mark.parametrize(
    "name, d, di, m, deep, expected",
    [("input", 32, 16, 8, False, 7_241), ("attention", 32, 16, 8, True, 9_289),
     ("cerebellum", 8, 8, 4, False, 817), ("hippocampus", 8, 8, 8, True, 1_425)],
)
def test_region_rule_param_counts(name, d, di, m, deep, expected):
    cfg = CtmConfig.region(name, d, di, m, deep, 16, ExitStrategy.adaptive_gate(0.1))
    assert count_params(init_ctm(cfg)[0]) == expected


def test_synapse_widths_rounding():
    assert CtmConfig(d_model=256, min_width=16, synapse_depth=4).synapse_widths == [256, 176, 96, 16]
    assert CtmConfig(d_model=32, d_input=16, min_width=8, synapse_depth=3).synapse_widths == [32, 20, 8]


def test_identical_configs_identical_weights():
    a, _ = init_ctm(SMALL, 7)
    b, _ = init_ctm(SMALL, 7)
    for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0]):
        np.testing.assert_array_equal(x, y)


def test_self_pairs_forced():
    _, buffers = init_ctm(SMALL, 7)
    np.testing.assert_array_equal(buffers["left_out"][:2], buffers["right_out"][:2])
    np.testing.assert_array_equal(buffers["left_action"][:2], buffers["right_action"][:2])


def test_forward_shapes_and_certainty_range():
    params, buffers = init_ctm(SMALL, 7)
    obs = np.random.default_rng(0).standard_normal((3, 4, 7)).astype(np.float32)
    preds, cert, state = ctm_forward(params, buffers, SMALL, obs)
    assert preds.shape == (3, SMALL.ticks, SMALL.out_dims)
    assert cert.shape == (3, SMALL.ticks, 2)
    assert np.all((cert >= 0) & (cert <= 1))
    np.testing.assert_allclose(cert.sum(-1), 1.0, rtol=1e-6)
    assert state["trace"].shape == (SMALL.d_model, 3, SMALL.memory_length)


def test_gradients_match_torch_autograd():
    params, buffers = init_ctm(SMALL, 7)
    params = as_float64(params)
    rng = np.random.default_rng(1)
    params["decay_out"] = rng.uniform(0.2, 2.0, SMALL.n_synch_out)  # off the init value, inside the clamp
    params["decay_action"] = rng.uniform(0.2, 2.0, SMALL.n_synch_action)
    obs = rng.standard_normal((3, 4, 7))
    targets = np.array([1, 2, 4])

    loss, grads = mg.value_and_grad(ce_loss(buffers, SMALL, obs, targets))(params)

    tp = torch_ctm.to_torch(params, torch.float64)
    preds = torch_ctm.ctm_forward(tp, buffers, SMALL, torch.tensor(obs))
    t_loss = torch.nn.functional.cross_entropy(preds.reshape(-1, SMALL.out_dims), torch.tensor(targets).repeat_interleave(SMALL.ticks))
    t_loss.backward()
    t_grads = torch_ctm.from_torch_grads(tp)

    np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-12)
    ours, td = tree_flatten(grads)
    theirs, _ = tree_flatten(t_grads)
    for g, t in zip(ours, theirs):
        np.testing.assert_allclose(g, t, rtol=1e-9, atol=1e-12)
    assert np.abs(grads["decay_out"]).max() > 0, "decay parameters must receive gradient"
    assert np.abs(grads["start_trace"]).max() > 0, "the start trace must receive gradient"
    assert np.abs(grads["kv_proj"]["w"]).max() > 0


def test_gradients_match_finite_differences():
    params, buffers = init_ctm(SMALL, 7)
    params = as_float64(params)
    rng = np.random.default_rng(2)
    obs = rng.standard_normal((2, 3, 7))
    targets = np.array([0, 3])
    loss_fn = ce_loss(buffers, SMALL, obs, targets)
    _, grads = mg.value_and_grad(loss_fn)(params)

    leaves, td = tree_flatten(params)
    grad_leaves = tree_flatten(grads)[0]
    eps = 1e-6
    for i, (leaf, g) in enumerate(zip(leaves, grad_leaves)):
        for _ in range(2):
            idx = tuple(int(rng.integers(0, s)) for s in leaf.shape)
            plus = [x.copy() for x in leaves]
            minus = [x.copy() for x in leaves]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            fd = (loss_fn(tree_unflatten(td, plus)) - loss_fn(tree_unflatten(td, minus))) / (2 * eps)
            assert abs(fd - g[idx]) <= 1e-6 * max(1.0, abs(fd)), (i, idx, fd, g[idx])


def test_state_carries_across_calls():
    params, buffers = init_ctm(SMALL, 7)
    obs = np.random.default_rng(3).standard_normal((2, 4, 7)).astype(np.float32)
    _, _, state = ctm_forward(params, buffers, SMALL, obs)
    again_fresh, _, _ = ctm_forward(params, buffers, SMALL, obs)
    continued, _, _ = ctm_forward(params, buffers, SMALL, obs, state)
    assert not np.allclose(again_fresh, continued)


def test_thousand_ticks_stay_finite():
    cfg = SMALL.replace(ticks=1000)
    params, buffers = init_ctm(cfg, 7)
    obs = np.random.default_rng(4).standard_normal((2, 4, 7)).astype(np.float32)
    preds, cert, state = ctm_forward(params, buffers, cfg, obs)
    assert np.isfinite(preds).all()
    assert np.isfinite(state["trace"]).all()


def test_no_action_sync_and_single_head():
    cfg = SMALL.replace(n_synch_action=0, heads=1, n_random_pairing_self=0)
    params, buffers = init_ctm(cfg, 7)
    obs = np.random.default_rng(5).standard_normal((2, 4, 7))
    loss, grads = mg.value_and_grad(ce_loss(buffers, cfg, obs, np.array([1, 2])))(as_float64(params))
    assert np.isfinite(loss)
    assert grads["q_proj"]["w"].shape == (0, cfg.d_input)


def test_shallow_nlm_depth_one_synapse():
    cfg = SMALL.replace(deep_nlms=False, memory_hidden_dims=0, synapse_depth=1)
    params, buffers = init_ctm(cfg, 7)
    assert "stage2" not in params["nlm"]
    assert "down" not in params["synapse"]
    obs = np.random.default_rng(6).standard_normal((2, 4, 7))
    loss, _ = mg.value_and_grad(ce_loss(buffers, cfg, obs, np.array([1, 2])))(as_float64(params))
    assert np.isfinite(loss)


@pytest.mark.max
def test_compiled_train_step_matches_numpy():
    params, buffers = init_ctm(SMALL, 7)
    rng = np.random.default_rng(7)
    obs = rng.standard_normal((3, 4, 7)).astype(np.float32)
    targets = np.array([1, 2, 3])

    def loss(p, x, y):
        return ce_loss(buffers, SMALL, x, y)(p)

    eager_loss, eager_grads = mg.value_and_grad(loss)(params, obs, targets)
    step = mg.compile(mg.value_and_grad(loss), device="cpu", dims=(None, ("B", 4, 7), ("B",)))
    loss_c, grads_c = step(params, obs, targets)
    np.testing.assert_allclose(loss_c, eager_loss, rtol=1e-5)
    for g, e in zip(tree_flatten(grads_c)[0], tree_flatten(eager_grads)[0]):
        # float32 gradients summed over 5 ticks and a batch: 1e-4 relative, reordered reductions
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.max
@pytest.mark.slow
def test_compiled_glue_gradients():
    """With host_glue=False every part of the train step runs as a MAX graph, as on a GPU."""
    params, buffers = init_ctm(SMALL, 7)
    rng = np.random.default_rng(7)
    obs = rng.standard_normal((3, 4, 7)).astype(np.float32)
    targets = np.array([1, 2, 3])

    def loss(p, x, y):
        return ce_loss(buffers, SMALL, x, y)(p)

    _, eager_grads = mg.value_and_grad(loss)(params, obs, targets)
    step = mg.compile(mg.value_and_grad(loss), device="cpu", dims=(None, ("B", 4, 7), ("B",)), host_glue=False)
    _, grads_c = step(params, obs, targets)
    for g, e in zip(tree_flatten(grads_c)[0], tree_flatten(eager_grads)[0]):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
