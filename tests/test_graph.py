"""Brains: preset sizes, weights, the forward pass and its exact gradients, the neural computer.

Numerics run eagerly on numpy. Gradient checks use float64 central differences (step 1e-6) and
require a relative error below 1e-5.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import modgrad as mg
from modgrad import ops
from modgrad.ctm.config import CtmConfig, ExitStrategy
from modgrad.ctm.rng import SimpleRng
from modgrad.ctm.weights import init_ctm
from modgrad.engine.pytree import tree_flatten, tree_map, tree_unflatten
from modgrad.graph import (
    Connection,
    NeuralComputer,
    RegionalConfig,
    RouterConfig,
    brain_forward_tokens,
    brain_step,
    buffer_shapes,
    byte_features,
    count_brain_params,
    eight_region,
    eight_region_billion,
    eight_region_large,
    eight_region_medium,
    eight_region_small,
    four_region,
    init_brain,
    init_brain_state,
    param_shapes,
)
from modgrad.graph import brain as brain_module
from modgrad.graph.brain import top_k_mask
from modgrad.graph.computer import ACT_START, VID_START, sidecar_path
from modgrad.graph.weights import region_param_shapes

# --------------------------------------------------------------------------------------------
# Helpers


def _region(d: int, di: int, m: int, deep: bool, depth: int, sa: int, ticks: int = 2) -> CtmConfig:
    return CtmConfig(
        ticks=ticks,
        d_model=d,
        d_input=di,
        heads=2 if di % 2 == 0 else 1,
        n_synch_out=d,
        n_synch_action=sa,
        synapse_depth=depth,
        memory_length=m,
        deep_nlms=deep,
        memory_hidden_dims=2 if deep else 0,
        out_dims=d,
        min_width=3,
        exit_strategy=ExitStrategy.adaptive_gate(0.1),
    )


def tiny_config(router: bool = False, outer_ticks: int = 2, out_dims: int = 7, raw_obs_dim: int = 10) -> RegionalConfig:
    """Three tiny regions: 2 -> 0 (+ observation), 0 and 1 -> 2 (two summed edges), 1 reads obs_proj."""
    regions = [_region(4, 4, 3, False, 1, 3), _region(6, 4, 3, True, 2, 4), _region(5, 6, 2, True, 1, 5)]
    connections = [Connection((2,), 0, True), Connection((0, 1), 2), Connection((1,), 2)]
    return RegionalConfig(
        regions=regions,
        region_names=("input", "attention", "output"),
        connections=connections,
        outer_ticks=outer_ticks,
        n_global_sync=9,
        out_dims=out_dims,
        raw_obs_dim=raw_obs_dim,
        router=RouterConfig(d_route=3, tick_embed_dim=2, k=2) if router else None,
    )


def float64_params(params: dict, rng: np.random.Generator, noise: float = 0.1) -> dict:
    """Cast to float64 and perturb, so no two Linears of one shape stay identical."""
    return tree_map(lambda x: (x + noise * rng.standard_normal(x.shape)).astype(np.float64), params)


def leaf_paths(tree, prefix: str = "") -> list[str]:
    """Dotted names of the leaves, in tree_flatten order."""
    if isinstance(tree, dict):
        return [p for k in sorted(tree) for p in leaf_paths(tree[k], f"{prefix}.{k}" if prefix else k)]
    if isinstance(tree, (list, tuple)):
        return [p for i, x in enumerate(tree) for p in leaf_paths(x, f"{prefix}[{i}]")]
    return [prefix]


# --------------------------------------------------------------------------------------------
# Presets and parameter counts


@pytest.mark.parametrize(
    "make, args, expected",
    [
        (eight_region_small, (128, 256, 16), 408_777),
        (eight_region_small, (128, 100, 16), 187_881),
        (four_region, (128, 256, 16), 1_113_413),
        (eight_region, (128, 256, 16), 17_198_985),
        (eight_region, (32, 8192, 2), 80_994_889),
        (eight_region, (32, 256, 2), 15_665_737),
        (eight_region_medium, (128, 256, 16), 4_648_233),
        (eight_region_medium, (32, 8192, 2), 36_320_361),
        (eight_region_large, (128, 256, 16), 17_190_793),
        (eight_region_large, (32, 8192, 2), 80_992_841),
        (eight_region_billion, (128, 256, 16), 95_051_337),
        (eight_region_billion, (32, 8192, 2), 223_113_225),
    ],
)
def test_preset_param_count(make, args, expected):
    assert count_brain_params(make(*args)) == expected


def test_billion_counts_fast():
    start = time.perf_counter()
    count_brain_params(eight_region_billion(128, 256, 16))
    assert time.perf_counter() - start < 2.0


def test_extra_heads_flag_drops_seven_heads():
    cfg = eight_region_small(128, 100, 16)
    dropped = count_brain_params(cfg) - count_brain_params(cfg.replace(extra_heads=False))
    assert dropped == 7 * (cfg.n_global_sync * 100 + 100)
    assert "extra_heads" not in init_brain(cfg.replace(extra_heads=False))[0]


def test_preset_structure():
    cfg = eight_region(128, 256, 16)
    assert cfg.n_regions == 8
    assert cfg.total_d == 2304
    assert cfg.n_global_sync == 1024
    assert cfg.outer_ticks == 16
    assert cfg.router is not None
    assert cfg.connections[1].sources == (0, 7)
    assert cfg.region_index("hippo") == 7
    assert [r.exit_strategy.beta for r in cfg.regions] == [0.05, 0.10, 0.10, 0.05, 0.05, 0.10, 0.05, 0.15]
    small = eight_region_small(128, 256, 16)
    assert small.router is None
    assert len(small.connections) == 10
    assert small.n_global_sync == 160


@pytest.mark.parametrize("make", [four_region, eight_region_small, eight_region])
def test_config_dict_roundtrip(make):
    cfg = make(32, 64, 3)
    assert RegionalConfig.from_dict(cfg.to_dict()) == cfg


def test_config_rejects_bad_connection():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="region 5"):
        cfg.replace(connections=[Connection((5,), 0)])


def test_config_rejects_bad_scale_dims():
    with pytest.raises(ValueError, match="obs_scale_dims"):
        tiny_config().replace(obs_scale_dims=(3, 3))


def test_config_rejects_unconnected_width_mismatch():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="no incoming connection"):
        cfg.replace(connections=[Connection((2,), 0, True)])  # region 2 (Di 6) would read obs_proj (width 4)


# --------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("router", [False, True])
def test_param_shapes_match_init(router):
    cfg = tiny_config(router) if router else eight_region_small(16, 64, 2)
    params, buffers = init_brain(cfg)
    leaves, treedef = tree_flatten(params)
    specs, spec_treedef = tree_flatten(param_shapes(cfg))
    assert treedef == spec_treedef
    assert [leaf.shape for leaf in leaves] == [spec.shape for spec in specs]
    assert sum(leaf.size for leaf in leaves) == count_brain_params(cfg)
    buffer_leaves, buffer_treedef = tree_flatten(buffers)
    buffer_specs, buffer_spec_treedef = tree_flatten(buffer_shapes(cfg))
    assert buffer_treedef == buffer_spec_treedef
    assert [(b.shape, str(b.dtype)) for b in buffer_leaves] == [(s.shape, s.dtype) for s in buffer_specs]


@pytest.mark.parametrize(
    "region",
    [_region(4, 4, 3, False, 1, 3), _region(6, 4, 3, True, 2, 4), CtmConfig.region("r", 32, 16, 8, True, 2, ExitStrategy.none())],
)
def test_region_shapes_match_init_ctm(region):
    leaves, treedef = tree_flatten(init_ctm(region, 11)[0])
    specs, spec_treedef = tree_flatten(region_param_shapes(region, 11))
    assert treedef == spec_treedef
    assert [leaf.shape for leaf in leaves] == [spec.shape for spec in specs]


def test_byte_features_values():
    # 'A': position, alphabetic, uppercase, not digit, not space, not punctuation, graphic, popcount 2
    np.testing.assert_allclose(byte_features(65), [65 / 128 - 1, 1, 1, -1, -1, -1, 1, -0.5])
    np.testing.assert_allclose(byte_features(32), [32 / 128 - 1, -1, -1, -1, 1, -1, -1, -0.75])
    np.testing.assert_allclose(byte_features(10), [10 / 128 - 1, -1, -1, -1, 1, -1, -1, -0.5])
    np.testing.assert_allclose(byte_features(ord("7")), [55 / 128 - 1, -1, -1, 1, -1, -1, 1, 0.25])
    np.testing.assert_allclose(byte_features(ord("!")), [33 / 128 - 1, -1, -1, -1, -1, 1, 1, -0.5])
    np.testing.assert_allclose(byte_features(ord("z")), [122 / 128 - 1, 1, -1, -1, -1, -1, 1, 0.25])
    np.testing.assert_allclose(byte_features(255), [255 / 128 - 1, -1, -1, -1, -1, -1, -1, 1.0])


def test_embedding_table_layout():
    cfg = eight_region_small(16, 300, 2)
    table = init_brain(cfg)[0]["embeddings"]
    assert table.shape == (300, 16)
    assert table.dtype == np.float32
    features = np.stack([byte_features(b) for b in range(256)])
    np.testing.assert_array_equal(table[:256, :8], features)
    # The first random entry is token 0, dim 8: the first normal of SimpleRng(42), scaled by sqrt(1/16).
    assert table[0, 8] == pytest.approx(float(SimpleRng(42).normal(1)[0]) * 0.25, rel=1e-6)
    random = np.concatenate([table[:256, 8:].ravel(), table[256:].ravel()])
    assert abs(random.std() - 0.25) < 0.02
    assert not np.allclose(table[256:, :8], features[:44])


def test_embedding_narrower_than_features():
    table = init_brain(tiny_config(raw_obs_dim=5))[0]["embeddings"]  # 7 tokens, 5 dims: all fixed
    np.testing.assert_array_equal(table, np.stack([byte_features(b)[:5] for b in range(7)]))


# --------------------------------------------------------------------------------------------
# Forward


@pytest.fixture(scope="module")
def small_brain():
    cfg = eight_region_small(16, 64, 2)
    params, buffers = init_brain(cfg)
    return cfg, params, buffers


def test_brain_step_shapes(small_brain):
    cfg, params, buffers = small_brain
    state = init_brain_state(params, cfg, 3)
    obs = params["embeddings"][[1, 2, 3]]
    logits, new_state = brain_step(params, buffers, cfg, obs, state)
    assert logits.shape == (3, 2, 64)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert new_state["global_alpha"].shape == (3, cfg.n_global_sync)
    assert [s["z"].shape for s in new_state["regions"]] == [(3, r.d_model) for r in cfg.regions]
    assert not np.allclose(logits[0], logits[1])


def test_brain_step_rejects_obs_width(small_brain):
    cfg, params, buffers = small_brain
    state = init_brain_state(params, cfg, 1)
    with pytest.raises(ValueError, match="observation width 15"):
        brain_step(params, buffers, cfg, np.zeros((1, 15), np.float32), state)


def test_forward_tokens_shapes_and_carry(small_brain):
    cfg, params, buffers = small_brain
    tokens = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    logits, state = brain_forward_tokens(params, buffers, cfg, tokens)
    assert logits.shape == (2, 3, 2, 64)
    # Running the window as two calls that carry the state gives the same logits.
    first, mid = brain_forward_tokens(params, buffers, cfg, tokens[:, :2])
    second, _ = brain_forward_tokens(params, buffers, cfg, tokens[:, 2:], mid)
    np.testing.assert_allclose(np.concatenate([first, second], 1), logits, rtol=1e-5, atol=1e-6)


def test_forward_tokens_carries_memory(small_brain):
    cfg, params, buffers = small_brain
    a, _ = brain_forward_tokens(params, buffers, cfg, np.array([[10, 5]]))
    b, _ = brain_forward_tokens(params, buffers, cfg, np.array([[40, 5]]))
    assert np.abs(a[0, 1] - b[0, 1]).max() > 1e-6


@pytest.mark.parametrize("router", [False, True])
def test_outer_scan_matches_loop(router, monkeypatch):
    cfg = tiny_config(router, outer_ticks=5)
    params, buffers = init_brain(cfg)
    params = float64_params(params, np.random.default_rng(1))
    obs = np.random.default_rng(2).standard_normal((2, cfg.raw_obs_dim))
    state = init_brain_state(params, cfg, 2)
    scanned, _ = brain_step(params, buffers, cfg, obs, state)
    monkeypatch.setattr(brain_module, "MAX_UNROLLED_OUTER_TICKS", 8)
    looped, _ = brain_step(params, buffers, cfg, obs, state)
    np.testing.assert_allclose(scanned, looped, rtol=1e-12, atol=1e-12)


def test_top_k_mask_picks_largest(rng):
    weights = rng.random((3, 5, 4))  # (B, src, dst)
    mask = top_k_mask(weights, 3, axis=1)
    np.testing.assert_array_equal(mask.sum(1), np.full((3, 4), 3.0))
    expected = weights >= np.sort(weights, axis=1)[:, -3:-2, :]
    np.testing.assert_array_equal(mask, expected.astype(mask.dtype))


def test_router_reads_observation_when_enabled():
    cfg = tiny_config(router=True)
    params, buffers = init_brain(cfg)
    state = init_brain_state(params, cfg, 1)
    obs_a, obs_b = np.ones((1, cfg.raw_obs_dim), np.float32), -np.ones((1, cfg.raw_obs_dim), np.float32)
    a, _ = brain_step(params, buffers, cfg, obs_a, state)
    b, _ = brain_step(params, buffers, cfg, obs_b, state)
    assert np.abs(a - b).max() > 1e-6
    blind = cfg.replace(router=RouterConfig(d_route=3, tick_embed_dim=2, k=2, observe_input=False))
    a, _ = brain_step(params, buffers, blind, obs_a, state)
    b, _ = brain_step(params, buffers, blind, obs_b, state)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Gradients


CHECKED_LEAVES = [
    "edges[0].w",
    "edges[1].w",
    "edges[2].b",
    "obs_proj.w",
    "global_decay",
    "output_proj.w",
    "embeddings",
    "regions[0].start_trace",
    "regions[0].start_activated",
    "regions[1].nlm.stage2.w",
    "regions[1].synapse.up[0].linear.w",
    "regions[2].kv_proj.w",
    "regions[2].mha_in.w",
    "router.route_proj.w",
    "router.to_route[1].w",
    "router.from_route[2].b",
    "router.tick_embed",
]


@pytest.mark.parametrize("router", [False, True])
def test_gradients_match_finite_differences(router):
    cfg = tiny_config(router)
    params, buffers = init_brain(cfg)
    rng = np.random.default_rng(3)
    params = float64_params(params, rng)
    tokens = np.array([[1, 3], [4, 6]], np.int64)
    weights = rng.standard_normal((2, 2, cfg.outer_ticks, cfg.out_dims))

    def loss(p):
        logits, _ = brain_forward_tokens(p, buffers, cfg, tokens)
        return ops.sum(logits * weights)

    _, grads = mg.value_and_grad(loss)(params)
    leaves, treedef = tree_flatten(params)
    grad_leaves = tree_flatten(grads)[0]
    paths = leaf_paths(params)
    eps = 1e-6
    checked = 0
    for name in CHECKED_LEAVES:
        if name not in paths:
            continue
        i = paths.index(name)
        g = grad_leaves[i]
        flat = np.abs(g).ravel()
        picks = {int(np.argmax(flat))} | set(rng.choice(flat.size, size=min(2, flat.size), replace=False).tolist())
        for j in picks:
            if flat[j] < 1e-7:
                continue
            bumped = []
            for sign in (1.0, -1.0):
                leaf = leaves[i].copy()
                leaf.ravel()[j] += sign * eps
                bumped.append(float(loss(tree_unflatten(treedef, leaves[:i] + [leaf] + leaves[i + 1 :]))))
            numeric = (bumped[0] - bumped[1]) / (2 * eps)
            analytic = float(g.ravel()[j])
            assert abs(numeric - analytic) / max(abs(numeric), abs(analytic)) < 1e-5, (name, j, numeric, analytic)
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("remat", [False, True], ids=("saved", "remat"))
@pytest.mark.parametrize("router", [False, True])
def test_traced_gradients_match_eager(router, remat):
    """The traced program saves loop residuals (token, outer-tick and region-tick loops) unless remat."""
    cfg = tiny_config(router)
    params, buffers = init_brain(cfg)
    rng = np.random.default_rng(5)
    params = float64_params(params, rng)
    tokens = np.array([[1, 3, 0], [4, 6, 2]], np.int64)
    weights = rng.standard_normal((2, 3, cfg.outer_ticks, cfg.out_dims))

    def loss(p):
        logits, _ = brain_forward_tokens(p, buffers, cfg, tokens, remat=remat)
        return ops.sum(logits * weights)

    value, grads = mg.value_and_grad(loss)(params)
    traced_value, traced_grads = mg.compile(mg.value_and_grad(loss), device="numpy")(params)
    np.testing.assert_allclose(traced_value, value, rtol=1e-12)
    for path, got, want in zip(leaf_paths(params), tree_flatten(traced_grads)[0], tree_flatten(grads)[0]):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=path)


def test_gradient_reaches_source_region_through_edge():
    cfg = tiny_config()
    params, buffers = init_brain(cfg)
    params = float64_params(params, np.random.default_rng(4))
    # Global sync reads region 0 only, so region 2 influences the loss only through edge 2 -> 0.
    buffers = dict(buffers, global_left=np.zeros(9, np.int64), global_right=np.arange(9, dtype=np.int64) % 4)
    tokens = np.array([[2]], np.int64)

    def loss(p):
        logits, _ = brain_forward_tokens(p, buffers, cfg, tokens)
        return ops.sum(logits[:, :, 1] ** 2)

    _, grads = mg.value_and_grad(loss)(params)
    assert np.abs(grads["regions"][2]["synapse"]["first"]["linear"]["w"]).max() > 1e-8
    assert np.abs(grads["edges"][0]["w"]).max() > 1e-8


def test_gradient_crosses_tokens():
    cfg = tiny_config()
    params, buffers = init_brain(cfg)
    params = float64_params(params, np.random.default_rng(5))
    tokens = np.array([[2, 5]], np.int64)

    def loss(p):
        logits, _ = brain_forward_tokens(p, buffers, cfg, tokens)
        return ops.sum(logits[:, 1] ** 2)  # the second token's predictions only

    _, grads = mg.value_and_grad(loss)(params)
    assert np.abs(grads["embeddings"][2]).max() > 1e-8
    np.testing.assert_array_equal(grads["embeddings"][[0, 1, 3, 4, 6]], 0.0)


@pytest.mark.parametrize("router", [False, True])
@pytest.mark.parametrize("outer_ticks", [3, 5])  # 5 runs the outer loop as a scan
def test_truncated_gradients_stop_at_outer_ticks(router, outer_ticks):
    cfg = tiny_config(router, outer_ticks=outer_ticks)
    params, buffers = init_brain(cfg)
    params = float64_params(params, np.random.default_rng(6))
    obs = np.random.default_rng(7).standard_normal((2, cfg.raw_obs_dim))
    weights = np.arange(1.0, outer_ticks + 1.0)
    embeds = [params["router"]["tick_embed"][k] if router else None for k in range(outer_ticks)]

    def loss(p, truncate):
        logits, _ = brain_step(p, buffers, cfg, obs, init_brain_state(p, cfg, 2), truncate_gradients=truncate)
        return ops.sum(ops.sum(logits**2, (0, 2)) * weights)

    # The states entering each outer tick, as constants.
    states = [None]
    state = init_brain_state(params, cfg, 2)
    for k in range(outer_ticks - 1):
        state, _ = brain_module.outer_tick(params, buffers, cfg, obs, state, embeds[k], False)
        states.append(state)

    def tick_by_tick(p):
        total = 0.0
        for k in range(outer_ticks):
            start = init_brain_state(p, cfg, 2) if k == 0 else states[k]
            embed = p["router"]["tick_embed"][k] if router else None
            _, logits = brain_module.outer_tick(p, buffers, cfg, obs, start, embed, False)
            total = total + weights[k] * ops.sum(logits**2)
        return total

    exact_value, exact = mg.value_and_grad(lambda p: loss(p, False))(params)
    value, grads = mg.value_and_grad(lambda p: loss(p, True))(params)
    want_value, want = mg.value_and_grad(tick_by_tick)(params)
    np.testing.assert_allclose(value, exact_value, rtol=1e-12)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for path, got, expected in zip(leaf_paths(params), tree_flatten(grads)[0], tree_flatten(want)[0]):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, err_msg=path)
    differ = [path for path, a, b in zip(leaf_paths(params), tree_flatten(grads)[0], tree_flatten(exact)[0])
              if not np.allclose(a, b, rtol=1e-6, atol=1e-9)]
    assert "global_decay" in differ  # the exact gradient follows the global sync recurrence
    assert router or "edges[0].w" in differ  # and region 2's output through edge 2 -> 0 a tick later


# --------------------------------------------------------------------------------------------
# Spatial input regions


def spatial_config(outer_ticks: int = 2, n_tokens: int = 6) -> RegionalConfig:
    """tiny_config with region 0 attending over n_tokens observation tokens of width 10."""
    return tiny_config(outer_ticks=outer_ticks).replace(spatial_tokens=n_tokens, spatial_regions=(0,))


def test_spatial_config_validation():
    base = tiny_config()
    with pytest.raises(ValueError, match="disagree"):
        base.replace(spatial_tokens=4)
    with pytest.raises(ValueError, match="disagree"):
        base.replace(spatial_regions=(0,))
    with pytest.raises(ValueError, match="spatial region 3 does not exist"):
        base.replace(spatial_tokens=4, spatial_regions=(3,))
    with pytest.raises(ValueError, match="must be even"):
        tiny_config(raw_obs_dim=9).replace(spatial_tokens=4, spatial_regions=(0,))
    tiny_config(raw_obs_dim=9).replace(spatial_tokens=4, spatial_regions=(0,), spatial_position_code=False)


def test_spatial_config_roundtrip_and_shapes():
    cfg = spatial_config()
    assert RegionalConfig.from_dict(cfg.to_dict()) == cfg
    params, _ = init_brain(cfg)
    assert params["regions"][0]["kv_proj"]["w"].shape == (cfg.raw_obs_dim, cfg.regions[0].d_input)
    assert params["regions"][1]["kv_proj"]["w"].shape == (cfg.regions[1].d_input, cfg.regions[1].d_input)
    shapes = tree_flatten(param_shapes(cfg))[0]
    assert [s.shape for s in shapes] == [np.shape(x) for x in tree_flatten(params)[0]]
    assert count_brain_params(cfg) == sum(np.size(x) for x in tree_flatten(params)[0])


def test_spatial_position_code_layout():
    code = brain_module.spatial_position_code(9, 8)  # a 3 x 3 grid
    assert code.shape == (9, 8) and code.dtype == np.float32
    np.testing.assert_allclose(code[0], [0, 1, 0, 1, 0, 1, 0, 1], atol=1e-7)
    np.testing.assert_array_equal(code[3, :4], code[5, :4])  # same row (1): same first half
    np.testing.assert_array_equal(code[1, 4:], code[7, 4:])  # same column (1): same second half
    assert not np.allclose(code[1, :4], code[4, :4])
    np.testing.assert_allclose(code[4, 0], np.sin(1.0), rtol=1e-6)


def test_spatial_brain_reads_every_token():
    cfg = spatial_config()
    params, buffers = init_brain(cfg)
    params = float64_params(params, np.random.default_rng(7))
    obs = np.random.default_rng(8).standard_normal((2, cfg.spatial_tokens, cfg.raw_obs_dim))
    state = init_brain_state(params, cfg, 2)
    logits, _ = brain_step(params, buffers, cfg, obs, state)
    assert logits.shape == (2, cfg.outer_ticks, cfg.out_dims)
    moved = obs.copy()
    moved[:, 4] += 1.0  # a token that no flat consumer reads
    changed, _ = brain_step(params, buffers, cfg, moved, state)
    assert np.abs(changed - logits).max() > 1e-6
    with pytest.raises(ValueError, match="pass the whole token set"):
        brain_step(params, buffers, cfg, obs[:, 0], state)
    with pytest.raises(ValueError, match="token-set observations"):
        brain_forward_tokens(params, buffers, cfg, np.zeros((1, 2), np.int64))


def test_unconnected_spatial_region_reads_tokens():
    # Region 1 has no incoming connection, so as a spatial region it does not read obs_proj.
    cfg = tiny_config().replace(spatial_tokens=6, spatial_regions=(1,))
    assert cfg.unconnected_regions == []
    params, buffers = init_brain(cfg)
    params = float64_params(params, np.random.default_rng(10))
    obs = np.random.default_rng(11).standard_normal((2, cfg.spatial_tokens, cfg.raw_obs_dim))

    def loss(p):
        logits, _ = brain_step(p, buffers, cfg, obs, init_brain_state(p, cfg, 2))
        return ops.sum(logits**2)

    _, grads = mg.value_and_grad(loss)(params)
    np.testing.assert_array_equal(grads["obs_proj"]["w"], 0.0)
    assert np.abs(grads["regions"][1]["kv_proj"]["w"]).max() > 1e-8
    assert np.abs(grads["regions"][1]["q_proj"]["w"]).max() > 1e-8


def test_spatial_region_keeps_edge_input():
    cfg = spatial_config()
    params, buffers = init_brain(cfg)
    params = float64_params(params, np.random.default_rng(12))
    obs = np.random.default_rng(13).standard_normal((1, cfg.spatial_tokens, cfg.raw_obs_dim))
    state = init_brain_state(params, cfg, 1)
    before, _ = brain_step(params, buffers, cfg, obs, state)
    edges = [dict(e) for e in params["edges"]]
    edges[0] = {"w": edges[0]["w"] * 3.0, "b": edges[0]["b"] + 1.0}  # the edge into spatial region 0
    after, _ = brain_step(dict(params, edges=edges), buffers, cfg, obs, state)
    assert np.abs(after[:, 1] - before[:, 1]).max() > 1e-6


SPATIAL_CHECKED_LEAVES = [
    "regions[0].kv_proj.w",
    "regions[0].kv_ln.g",
    "regions[0].q_proj.w",
    "regions[0].decay_action",
    "regions[0].mha_in.w",
    "regions[0].start_trace",
    "regions[1].synapse.up[0].linear.w",
    "obs_proj.w",
    "edges[0].w",
    "edges[1].w",
    "output_proj.w",
]


@pytest.mark.parametrize("outer_ticks", [2, 5])  # 5 runs the outer loop as a scan
def test_spatial_gradients_match_finite_differences(outer_ticks):
    cfg = spatial_config(outer_ticks)
    params, buffers = init_brain(cfg)
    rng = np.random.default_rng(9)
    params = float64_params(params, rng)
    obs = rng.standard_normal((2, cfg.spatial_tokens, cfg.raw_obs_dim))
    weights = rng.standard_normal((2, cfg.outer_ticks, cfg.out_dims))

    def loss(p, x):
        logits, _ = brain_step(p, buffers, cfg, x, init_brain_state(p, cfg, 2))
        return ops.sum(logits * weights)

    _, (grads, obs_grad) = mg.value_and_grad(loss, argnums=(0, 1))(params, obs)
    # The edge into the spatial region feeds its extra token, and its query matters, unlike a one-token region's.
    assert np.abs(grads["edges"][0]["w"]).max() > 1e-8
    assert np.abs(grads["regions"][0]["q_proj"]["w"]).max() > 1e-8
    assert np.abs(obs_grad[:, 1:]).max() > 1e-8

    leaves, treedef = tree_flatten(params)
    grad_leaves = tree_flatten(grads)[0]
    paths = leaf_paths(params)
    eps, checked = 1e-6, 0
    targets = [(paths.index(n), grad_leaves[paths.index(n)]) for n in SPATIAL_CHECKED_LEAVES] + [(None, obs_grad)]
    for i, g in targets:
        flat = np.abs(g).ravel()
        picks = {int(np.argmax(flat))} | set(rng.choice(flat.size, size=min(2, flat.size), replace=False).tolist())
        for j in picks:
            if flat[j] < 1e-7:
                continue
            bumped = []
            for sign in (1.0, -1.0):
                if i is None:
                    x = obs.copy()
                    x.ravel()[j] += sign * eps
                    bumped.append(float(loss(params, x)))
                else:
                    leaf = leaves[i].copy()
                    leaf.ravel()[j] += sign * eps
                    bumped.append(float(loss(tree_unflatten(treedef, leaves[:i] + [leaf] + leaves[i + 1 :]), obs)))
            numeric = (bumped[0] - bumped[1]) / (2 * eps)
            analytic = float(g.ravel()[j])
            assert abs(numeric - analytic) / max(abs(numeric), abs(analytic)) < 1e-5, (i, j, numeric, analytic)
            checked += 1
    assert checked >= 15


# --------------------------------------------------------------------------------------------
# Neural computer


@pytest.fixture(scope="module")
def text_brain():
    cfg = tiny_config(out_dims=300, raw_obs_dim=12)
    params, buffers = init_brain(cfg)
    params = tree_map(lambda x: x + np.float32(0.3) * np.random.default_rng(6).standard_normal(x.shape).astype(np.float32), params)
    return params, buffers, cfg


def test_chat_depends_on_context(text_brain):
    nc = NeuralComputer(*text_brain, seed=5)
    nc.observe(list(b"the quick brown fox"))
    reply_context = nc.chat("hi", 24, temperature=0.5)
    context_history = list(nc.history)

    nc.reset()
    assert nc.history == []
    nc.rng_state = 5
    reply_fresh = nc.chat("hi", 24, temperature=0.5)
    assert reply_context != reply_fresh
    assert context_history[:21] == list(b"the quick brown foxhi")
    assert 2 < len(nc.history) <= 2 + 24


def test_save_load_continues_exactly(text_brain, tmp_path):
    first = NeuralComputer(*text_brain, seed=11)
    first.observe(list(b"state to keep"))
    path = tmp_path / "nc.safetensors"
    first.save(path)
    assert sidecar_path(path).exists()
    expected = first.generate([3], 6, temperature=1.0)
    expected_logits = first.last_logits

    second = NeuralComputer(*text_brain, seed=999)
    second.load(path)
    assert second.history == list(b"state to keep")
    assert second.generate([3], 6, temperature=1.0) == expected
    np.testing.assert_array_equal(second.last_logits, expected_logits)
    assert second.history == first.history
    assert second.rng_state == first.rng_state


def test_load_rejects_other_config(text_brain, tmp_path):
    params, buffers, cfg = text_brain
    nc = NeuralComputer(params, buffers, cfg, seed=1)
    nc.step(1)
    path = tmp_path / "state.safetensors"
    nc.save(path)
    other = NeuralComputer(params, buffers, cfg.replace(name="other"), seed=1)
    with pytest.raises(ValueError, match="different config"):
        other.load(path)
    with pytest.raises(FileNotFoundError):
        nc.load(tmp_path / "missing.safetensors")


def test_bad_token_id_names_vocab(text_brain):
    nc = NeuralComputer(*text_brain, seed=1)
    with pytest.raises(ValueError, match="token id 300 .* 300 ids"):
        nc.step(300)
    with pytest.raises(ValueError, match="token id -1"):
        nc.observe([1, -1])
    assert nc.history == []


def test_sample_rules(text_brain):
    nc = NeuralComputer(*text_brain, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        nc.sample(np.zeros(4), -0.5)
    assert nc.sample(np.array([1.0, 3.0, 3.0, 0.0]), 0.0) == 2
    # LCG from state 0: u = (1442695040888963407 >> 33) / 2^31 ~ 0.0782, so [0.05, 0.95] picks 1.
    assert nc.sample(np.log(np.array([0.05, 0.95])), 1.0) == 1
    assert nc.rng_state == 1442695040888963407
    counts = np.bincount([nc.sample(np.log(np.array([0.2, 0.8])), 1.0) for _ in range(2000)], minlength=2)
    assert 300 < counts[0] < 500


def test_chat_stop_rules(text_brain, monkeypatch):
    nc = NeuralComputer(*text_brain, seed=0)
    fed = []

    def fake_step(token):
        fed.append(token)
        nc.last_logits = np.zeros(300)
        return nc.last_logits

    monkeypatch.setattr(nc, "step", fake_step)

    def script(tokens):
        it = iter(tokens)
        monkeypatch.setattr(nc, "sample", lambda logits, temperature: next(it))

    script([104, 105, VID_START, 33])
    assert nc.chat("a", 10) == "hi"
    assert fed == [97, 104, 105]

    fed.clear()
    script([104, 270, 271, 272, 273, 274, 275, 276, 105])
    assert nc.chat("", 10) == "h"
    assert fed == [104, 270, 271, 272, 273, 274]

    fed.clear()
    script([0xC3, 0xA9, ACT_START])
    assert nc.chat("", 10) == "é"
    script([0xC3, 0x28, 33])
    assert nc.chat("", 3) == "\ufffd(!"


def test_history_is_capped(text_brain):
    nc = NeuralComputer(*text_brain, seed=0, max_history=3)
    nc.observe([1, 2, 3, 4, 5])
    assert nc.history == [3, 4, 5]


@pytest.mark.slow
@pytest.mark.max
def test_compiled_step_matches_eager(text_brain):
    eager = NeuralComputer(*text_brain, seed=3)
    compiled = NeuralComputer(*text_brain, seed=3, device="cpu")
    tokens = [1, 2, 3, 200]
    np.testing.assert_allclose(compiled.observe(tokens), eager.observe(tokens), rtol=1e-4, atol=1e-5)
    assert compiled.generate([5], 4, temperature=0.0) == eager.generate([5], 4, temperature=0.0)
