"""A frozen Qwen2 mounted as a brain's cerebellum: the layer mix, projection and blend, and their training.

Everything runs eagerly on numpy. Gradient checks use float64 central differences (step 1e-6)
and require a relative error below 1e-5. Hidden states are compared with transformers in
float32 to rtol 1e-4, with an absolute floor of 1e-5 x the largest reference value.
"""

from __future__ import annotations

import numpy as np
import pytest

import modgrad as mg
from modgrad import ops
from modgrad.ctm.config import CtmConfig, ExitStrategy
from modgrad.engine.pytree import tree_flatten, tree_map
from modgrad.graph import Connection, RegionalConfig, brain_forward_tokens, init_brain
from modgrad.graph.cerebellum import (
    CerebellumConfig,
    cerebellum_forward_tokens,
    cerebellum_offsets,
    encode_context,
    init_cerebellum,
)
from modgrad.losses import cross_entropy
from modgrad.optim import AdamW
from modgrad.transformer import Qwen2, Qwen2Config, init_params

CEREBELLUM = 1


def _region(d: int, di: int, m: int, deep: bool) -> CtmConfig:
    return CtmConfig(
        ticks=2, d_model=d, d_input=di, heads=1, n_synch_out=d, n_synch_action=3, synapse_depth=1,
        memory_length=m, deep_nlms=deep, memory_hidden_dims=2 if deep else 0, out_dims=d, min_width=3,
        exit_strategy=ExitStrategy.adaptive_gate(0.1),
    )


def tiny_brain(names=("input", "cerebellum", "output"), outer_ticks: int = 2) -> RegionalConfig:
    """Three regions: output -> input (+ observation), input -> cerebellum, input and cerebellum -> output."""
    regions = [_region(4, 4, 3, False), _region(5, 4, 2, True), _region(6, 5, 3, False)]
    return RegionalConfig(
        regions=regions,
        region_names=names,
        connections=[Connection((2,), 0, True), Connection((0,), 1), Connection((0, 1), 2)],
        outer_ticks=outer_ticks,
        n_global_sync=9,
        out_dims=7,
        raw_obs_dim=6,
        extra_heads=False,
    )


def tiny_qwen(hidden: int = 12, layers: int = 3) -> Qwen2Config:
    return Qwen2Config(vocab_size=50, hidden_size=hidden, intermediate_size=20, num_hidden_layers=layers,
                       num_attention_heads=3, num_key_value_heads=1, head_dim=4, rope_theta=10000.0)


def float64(tree):
    return tree_map(lambda x: np.asarray(x, np.float64), tree)


@pytest.fixture
def setup():
    brain = tiny_brain()
    params, buffers = init_brain(brain)
    qwen = tiny_qwen()
    qwen_params = init_params(qwen, seed=1, std=0.3)
    cfg = CerebellumConfig.for_qwen2(brain, qwen)
    tokens = np.random.default_rng(2).integers(0, brain.out_dims, (3, 4))
    return brain, params, buffers, qwen, qwen_params, cfg, tokens


# --------------------------------------------------------------------------------------------
# Hidden states of the frozen model


def test_hidden_states_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=24, num_attention_heads=6, num_key_value_heads=2, intermediate_size=40,
                  num_hidden_layers=3, vocab_size=61, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # the default init zeroes biases and sets norms to 1
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 61, (2, 9))
    with torch.no_grad():
        outputs = hf(torch.from_numpy(ids), output_hidden_states=True)
    reference = np.stack([h.numpy() for h in outputs.hidden_states[1:]])  # after each layer, the last one normed

    got = Qwen2.from_pretrained(tmp_path, device="numpy").hidden_states(ids)
    assert got.shape == (3, 2, 9, 24)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_encode_context_matches_model_method(setup):
    _, _, _, qwen, qwen_params, _, tokens = setup
    expected = Qwen2(qwen, qwen_params, "numpy").hidden_states(tokens)
    np.testing.assert_array_equal(encode_context(qwen_params, tokens, qwen), expected)


# --------------------------------------------------------------------------------------------
# Mounting and initial values


def test_mount_finds_cerebellum_region(setup):
    brain, _, _, qwen, _, cfg, _ = setup
    assert cfg == CerebellumConfig(region=CEREBELLUM, hidden_size=12, n_layers=3)
    assert cfg.region_dim(brain) == 5


def test_mount_rejects_brain_without_cerebellum():
    brain = tiny_brain(names=("input", "attention", "output"))
    with pytest.raises(ValueError, match="cerebellum"):
        CerebellumConfig.for_qwen2(brain, tiny_qwen())


def test_init_follows_reference(setup):
    brain, _, _, _, _, cfg, _ = setup
    p = init_cerebellum(cfg, brain, seed=3)
    assert p["proj_out"]["w"].shape == (12, 5)
    bound = np.sqrt(6.0 / (12 + 5))
    assert np.abs(p["proj_out"]["w"]).max() <= bound
    assert np.abs(p["proj_out"]["w"]).max() > 0.5 * bound
    np.testing.assert_array_equal(p["proj_out"]["b"], np.zeros(5))
    np.testing.assert_array_equal(p["layer_logits"], np.zeros(3))
    np.testing.assert_array_equal(p["blend_logit"], [-2.0])
    assert all(leaf.dtype == np.float32 for leaf in tree_flatten(p)[0])


def test_offsets_mix_layers_and_scale_by_blend(rng):
    cfg = CerebellumConfig(region=0, hidden_size=4, n_layers=2)
    p = {
        "proj_out": {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)},
        "layer_logits": np.array([0.3, -0.5]),
        "blend_logit": np.array([0.7]),
    }
    hidden = rng.standard_normal((2, 2, 5, 4))  # (layers, B, L, H)
    mix = np.exp(p["layer_logits"]) / np.exp(p["layer_logits"]).sum()
    mixed = mix[0] * hidden[0] + mix[1] * hidden[1]
    expected = (mixed @ p["proj_out"]["w"] + p["proj_out"]["b"]) / (1.0 + np.exp(-0.7))
    got = cerebellum_offsets(p, hidden)
    assert cfg.n_layers == 2
    np.testing.assert_allclose(got, expected, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# The mounted brain


# Five outer ticks run as a scan instead of a Python loop, so both paths get the offsets.
@pytest.mark.parametrize("outer_ticks", [2, 5])
def test_zero_projection_leaves_brain_unchanged(setup, outer_ticks):
    _, _, _, qwen, qwen_params, cfg, tokens = setup
    brain = tiny_brain(outer_ticks=outer_ticks)
    params, buffers = init_brain(brain)
    cereb = init_cerebellum(cfg, brain)
    cereb["proj_out"] = {"w": np.zeros_like(cereb["proj_out"]["w"]), "b": np.zeros_like(cereb["proj_out"]["b"])}
    hidden = encode_context(qwen_params, tokens, qwen)
    mounted, _ = cerebellum_forward_tokens(params, buffers, brain, cereb, cfg, tokens, hidden)
    plain, _ = brain_forward_tokens(params, buffers, brain, tokens)
    np.testing.assert_array_equal(mounted, plain)


@pytest.mark.parametrize("outer_ticks", [2, 5])
def test_projection_changes_predictions(setup, outer_ticks):
    _, _, _, qwen, qwen_params, cfg, tokens = setup
    brain = tiny_brain(outer_ticks=outer_ticks)
    params, buffers = init_brain(brain)
    cereb = init_cerebellum(cfg, brain)
    cereb["blend_logit"] = np.array([2.0], np.float32)
    hidden = encode_context(qwen_params, tokens, qwen)
    mounted, _ = cerebellum_forward_tokens(params, buffers, brain, cereb, cfg, tokens, hidden)
    plain, _ = brain_forward_tokens(params, buffers, brain, tokens)
    assert mounted.shape == plain.shape == (3, 4, outer_ticks, 7)
    # Outer tick 0 already reads the offset through the global sync, so every prediction moves.
    assert np.abs(mounted - plain).min() > 0.0


def test_offset_enters_sync_not_region_state(setup):
    _, _, _, qwen, qwen_params, cfg, tokens = setup
    # No connection reads the cerebellum here, so only the global sync reads its output.
    brain = tiny_brain().replace(connections=(Connection((2,), 0, True), Connection((0,), 1), Connection((0,), 2)))
    params, buffers = init_brain(brain)
    cereb = init_cerebellum(cfg, brain)
    hidden = encode_context(qwen_params, tokens, qwen)
    mounted, mounted_state = cerebellum_forward_tokens(params, buffers, brain, cereb, cfg, tokens, hidden)
    plain, plain_state = brain_forward_tokens(params, buffers, brain, tokens)

    assert np.abs(mounted - plain).min() > 0.0
    for mounted_region, plain_region in zip(mounted_state["regions"], plain_state["regions"]):
        np.testing.assert_array_equal(mounted_region["z"], plain_region["z"])
    assert np.abs(mounted_state["global_alpha"] - plain_state["global_alpha"]).max() > 0.0


def test_hidden_size_mismatch_raises(setup):
    brain, params, buffers, _, _, cfg, tokens = setup
    other = tiny_qwen(hidden=16)
    hidden = encode_context(init_params(other, seed=4), tokens, other)  # (3, B, L, 16)
    cereb = init_cerebellum(cfg, brain)  # projection reads 12 features
    with pytest.raises(ValueError, match="hidden size 16") as err:
        cerebellum_forward_tokens(params, buffers, brain, cereb, cfg, tokens, hidden)
    assert "input width 12" in str(err.value)


def test_projection_of_other_model_raises(setup):
    brain, params, buffers, qwen, qwen_params, _, tokens = setup
    cfg16 = CerebellumConfig.for_qwen2(brain, tiny_qwen(hidden=16))
    cereb = init_cerebellum(cfg16, brain)
    hidden = encode_context(qwen_params, tokens, qwen)  # (3, B, L, 12)
    with pytest.raises(ValueError, match="hidden size 12") as err:
        cerebellum_forward_tokens(params, buffers, brain, cereb, cfg16, tokens, hidden)
    assert "input width 16" in str(err.value)


def test_window_mismatch_raises(setup):
    brain, params, buffers, qwen, qwen_params, cfg, tokens = setup
    hidden = encode_context(qwen_params, tokens[:, :3], qwen)
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        cerebellum_forward_tokens(params, buffers, brain, init_cerebellum(cfg, brain), cfg, tokens, hidden)


# --------------------------------------------------------------------------------------------
# Gradients and training


def _window_loss(brain, params, buffers, cfg, tokens, targets):
    def loss(cereb, hidden):
        logits, _ = cerebellum_forward_tokens(params, buffers, brain, cereb, cfg, tokens, hidden)
        return ops.mean(cross_entropy(logits[:, :, -1], targets))

    return loss


def test_projection_gradient_matches_finite_differences(setup):
    brain, params, buffers, qwen, qwen_params, cfg, tokens = setup
    rng = np.random.default_rng(5)
    params = float64(params)
    cereb = float64(init_cerebellum(cfg, brain, seed=6))
    cereb["layer_logits"] = rng.standard_normal(3)  # away from the even mix, so each layer's weight matters
    cereb["blend_logit"] = np.array([0.5])
    hidden = np.asarray(encode_context(qwen_params, tokens, qwen), np.float64)
    targets = rng.integers(0, brain.out_dims, tokens.shape)
    loss = _window_loss(brain, params, buffers, cfg, tokens, targets)

    _, grads = mg.value_and_grad(loss)(cereb, hidden)
    eps = 1e-6
    checked = [("proj_out", "w", (0, 0)), ("proj_out", "w", (7, 3)), ("proj_out", "b", (2,)),
               ("layer_logits", None, (1,)), ("blend_logit", None, (0,))]
    for key, sub, index in checked:
        bumped = []
        for sign in (1.0, -1.0):
            p = tree_map(np.copy, cereb)
            leaf = p[key][sub] if sub else p[key]
            leaf[index] += sign * eps
            bumped.append(float(loss(p, hidden)))
        numeric = (bumped[0] - bumped[1]) / (2 * eps)
        analytic = float((grads[key][sub] if sub else grads[key])[index])
        assert abs(analytic) > 1e-8, (key, sub, index)
        assert abs(numeric - analytic) / max(abs(numeric), abs(analytic)) < 1e-5, (key, sub, index, numeric, analytic)


def test_frozen_model_gets_no_gradient(setup):
    brain, params, buffers, qwen, qwen_params, cfg, tokens = setup
    targets = np.random.default_rng(7).integers(0, brain.out_dims, tokens.shape)
    window_loss = _window_loss(brain, params, buffers, cfg, tokens, targets)

    def loss(cereb, frozen):
        return window_loss(cereb, encode_context(frozen, tokens, qwen))

    _, (cereb_grads, qwen_grads) = mg.value_and_grad(loss, argnums=(0, 1))(init_cerebellum(cfg, brain), qwen_params)
    assert np.abs(cereb_grads["proj_out"]["w"]).max() > 0.0
    for leaf in tree_flatten(qwen_grads)[0]:
        np.testing.assert_array_equal(leaf, 0.0)


def test_training_projection_lowers_loss(setup):
    brain, params, buffers, qwen, qwen_params, cfg, tokens = setup
    qwen_before = tree_map(np.copy, qwen_params)
    brain_before = tree_map(np.copy, params)
    targets = np.random.default_rng(8).integers(0, brain.out_dims, tokens.shape)
    window_loss = _window_loss(brain, params, buffers, cfg, tokens, targets)

    def loss(cereb, frozen):
        return window_loss(cereb, encode_context(frozen, tokens, qwen))

    cereb = init_cerebellum(cfg, brain)
    opt = AdamW(lr=0.05, weight_decay=0.0)
    state = opt.init(cereb)
    losses = []
    for _ in range(40):
        value, grads = mg.value_and_grad(loss)(cereb, qwen_params)
        cereb, state = opt.update(cereb, grads, state)
        losses.append(float(value))

    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert float(cereb["blend_logit"][0]) != -2.0
    assert np.abs(cereb["layer_logits"]).max() > 0.0
    for before, after in zip(tree_flatten(qwen_before)[0], tree_flatten(qwen_params)[0]):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(tree_flatten(brain_before)[0], tree_flatten(params)[0]):
        np.testing.assert_array_equal(before, after)
