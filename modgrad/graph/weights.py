"""Brain weights: parameter shapes, counts without allocation, and initialisation.

The tree ``init_brain`` returns (``param_shapes`` has the same structure with ParamSpec leaves):

    embeddings        (out_dims, raw_obs_dim)
    regions[r]        one CTM parameter tree per region (modgrad.ctm.weights.init_ctm); kv_proj reads
                      Di_r, or raw_obs_dim for a spatial region
    edges[c]          Linear(connection_in_dim -> Di of the target), one per connection
    obs_proj          Linear(raw_obs_dim -> Di of region 0)
    global_decay      (n_global_sync,)
    output_proj       Linear(n_global_sync -> out_dims)
    outer_exit_gate   Linear(n_global_sync -> 1), iff the outer exit strategy is adaptive
    extra_heads[7]    Linear(n_global_sync -> out_dims), iff cfg.extra_heads
    router            to_route[i], from_route[j], tick_embed (K, tick_embed_dim), route_proj, iff cfg.router

Buffers (not trained): every region's sync pair indices, and the global sync pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modgrad.ctm.config import CtmConfig
from modgrad.ctm.rng import SimpleRng
from modgrad.ctm.weights import init_ctm, init_linear
from modgrad.engine.pytree import tree_flatten
from modgrad.graph.config import N_EXTRA_HEADS, RegionalConfig

N_BYTE_FEATURES = 8
TICK_EMBED_SEED = 0xDEADBEEF


@dataclass(frozen=True)
class ParamSpec:
    """Shape and dtype of one parameter, without its values."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _linear_spec(n_in: int, n_out: int) -> dict:
    return {"w": ParamSpec((n_in, n_out)), "b": ParamSpec((n_out,))}


def _layer_norm_spec(n: int) -> dict:
    return {"g": ParamSpec((n,)), "b": ParamSpec((n,))}


def region_param_shapes(cfg: CtmConfig, raw_input_dim: int) -> dict:
    """Return the structure of ``init_ctm(cfg, raw_input_dim)[0]`` with ParamSpec leaves."""
    d, m, h, di = cfg.d_model, cfg.memory_length, cfg.memory_hidden_dims, cfg.d_input
    so, sa = cfg.n_synch_out, cfg.n_synch_action

    def block(n_in, n_out):
        return {"linear": _linear_spec(n_in, n_out), "ln": _layer_norm_spec(n_out)}

    widths = cfg.synapse_widths
    synapse: dict = {"first": block(di + d, widths[0])}
    if len(widths) > 1:
        pairs = list(zip(widths[:-1], widths[1:]))
        synapse["down"] = [block(a, b) for a, b in pairs]
        synapse["up"] = [block(b, a) for a, b in pairs]
        synapse["skip_ln"] = [_layer_norm_spec(a) for a, _ in pairs]

    if cfg.deep_nlms:
        nlm = {
            "stage1": {"w": ParamSpec((d, m, 2 * h)), "b": ParamSpec((d, 2 * h))},
            "stage2": {"w": ParamSpec((d, h, 2)), "b": ParamSpec((d, 2))},
        }
    else:
        nlm = {"stage1": {"w": ParamSpec((d, m, 2)), "b": ParamSpec((d, 2))}}

    shapes = {
        "synapse": synapse,
        "nlm": nlm,
        "start_activated": ParamSpec((d,)),
        "start_trace": ParamSpec((d, m)),
        "kv_proj": _linear_spec(raw_input_dim, di),
        "kv_ln": _layer_norm_spec(di),
        "q_proj": _linear_spec(sa, di),
        "mha_in": _linear_spec(di, 3 * di),
        "mha_out": _linear_spec(di, di),
        "decay_out": ParamSpec((so,)),
        "decay_action": ParamSpec((sa,)),
        "output_proj": _linear_spec(so, cfg.out_dims),
    }
    if cfg.has_exit_gate:
        shapes["exit_gate"] = _linear_spec(so, 1)
    return shapes


def param_shapes(cfg: RegionalConfig) -> dict:
    """Return the structure of ``init_brain(cfg)[0]`` with ParamSpec leaves, without allocating arrays."""
    n_gs, out = cfg.n_global_sync, cfg.out_dims
    shapes: dict = {
        "embeddings": ParamSpec((out, cfg.raw_obs_dim)),
        "regions": [region_param_shapes(r, cfg.region_raw_dim(i)) for i, r in enumerate(cfg.regions)],
        "edges": [_linear_spec(cfg.connection_in_dim(c), cfg.regions[c.target].d_input) for c in cfg.connections],
        "obs_proj": _linear_spec(cfg.raw_obs_dim, cfg.regions[0].d_input),
        "global_decay": ParamSpec((n_gs,)),
        "output_proj": _linear_spec(n_gs, out),
    }
    if cfg.exit_strategy.kind == "adaptive_gate":
        shapes["outer_exit_gate"] = _linear_spec(n_gs, 1)
    if cfg.extra_heads:
        shapes["extra_heads"] = [_linear_spec(n_gs, out) for _ in range(N_EXTRA_HEADS)]
    if cfg.router is not None:
        rc, n = cfg.router, cfg.n_regions
        shapes["router"] = {
            "to_route": [_linear_spec(r.d_model, rc.d_route) for r in cfg.regions],
            "from_route": [_linear_spec(rc.d_route, r.d_input) for r in cfg.regions],
            "tick_embed": ParamSpec((cfg.outer_ticks, rc.tick_embed_dim)),
            "route_proj": _linear_spec(n_gs + rc.tick_embed_dim, n * n),
        }
    return shapes


def buffer_shapes(cfg: RegionalConfig) -> dict:
    """Return the structure of ``init_brain(cfg)[1]`` (sync pair indices) with int64 ParamSpec leaves."""
    regions = []
    for r in cfg.regions:
        so, sa = ParamSpec((r.n_synch_out,), "int64"), ParamSpec((r.n_synch_action,), "int64")
        regions.append({"left_out": so, "right_out": so, "left_action": sa, "right_action": sa})
    pairs = ParamSpec((cfg.n_global_sync,), "int64")
    return {"regions": regions, "global_left": pairs, "global_right": pairs}


def count_brain_params(cfg: RegionalConfig) -> int:
    """Number of trainable scalars, computed from shapes (the billion preset counts in milliseconds)."""
    return sum(spec.size for spec in tree_flatten(param_shapes(cfg))[0])


# --------------------------------------------------------------------------------------------
# Initialisation


def byte_features(token: int) -> np.ndarray:
    """Fixed features of byte ``token``: position in [-1, 1), six ASCII classes as +-1, popcount/4 - 1."""
    b = int(token)
    alpha = 65 <= b <= 90 or 97 <= b <= 122
    punct = 33 <= b <= 47 or 58 <= b <= 64 or 91 <= b <= 96 or 123 <= b <= 126
    flags = [alpha, 65 <= b <= 90, 48 <= b <= 57, b in (32, 10), punct, 33 <= b <= 126]
    values = [b / 128.0 - 1.0] + [1.0 if f else -1.0 for f in flags] + [bin(b).count("1") / 4.0 - 1.0]
    return np.asarray(values, np.float32)


def init_embeddings(out_dims: int, raw_obs_dim: int, rng: SimpleRng) -> np.ndarray:
    """(out_dims, raw_obs_dim): byte features in dims 0-7 of tokens < 256, N(0, 1/raw_obs_dim) elsewhere.

    Random draws are consumed token by token, dims in order, skipping the fixed entries.
    """
    n_tokens, n_dims = min(out_dims, 256), min(N_BYTE_FEATURES, raw_obs_dim)
    random = np.ones((out_dims, raw_obs_dim), bool)
    random[:n_tokens, :n_dims] = False

    table = np.empty((out_dims, raw_obs_dim), np.float32)
    table[random] = rng.normal(int(random.sum())) * np.float32(np.sqrt(1.0 / raw_obs_dim))
    features = np.stack([byte_features(b) for b in range(n_tokens)])  # (n_tokens, 8)
    table[:n_tokens, :n_dims] = features[:, :n_dims]
    return table


def init_router(cfg: RegionalConfig) -> dict:
    rc, n = cfg.router, cfg.n_regions
    tick_embed = SimpleRng(TICK_EMBED_SEED).normal(cfg.outer_ticks * rc.tick_embed_dim) * np.float32(0.25)
    return {
        "to_route": [init_linear(r.d_model, rc.d_route) for r in cfg.regions],
        "from_route": [init_linear(rc.d_route, r.d_input) for r in cfg.regions],
        "tick_embed": tick_embed.reshape(cfg.outer_ticks, rc.tick_embed_dim).astype(np.float32),
        "route_proj": init_linear(cfg.n_global_sync + rc.tick_embed_dim, n * n),
    }


def init_brain(cfg: RegionalConfig, seed: int = 42) -> tuple[dict, dict]:
    """Return (params, buffers) as float32 / int64 numpy trees.

    With seed 42 every tensor follows the reference's init. One SimpleRng(seed) draws the
    embeddings and then the global sync pairs. Every region draws its start states and sync
    pairs from its own SimpleRng(seed). Linear layers seed from their (in, out) sizes, so all
    Linears of one shape start identical: the 7 extra heads equal output_proj at init.
    """
    rng = SimpleRng(seed)
    embeddings = init_embeddings(cfg.out_dims, cfg.raw_obs_dim, rng)
    global_left = rng.below(cfg.n_global_sync, cfg.total_d)
    global_right = rng.below(cfg.n_global_sync, cfg.total_d)

    regions = [init_ctm(r, cfg.region_raw_dim(i), seed=seed) for i, r in enumerate(cfg.regions)]
    n_gs = cfg.n_global_sync
    params: dict = {
        "embeddings": embeddings,
        "regions": [p for p, _ in regions],
        "edges": [init_linear(cfg.connection_in_dim(c), cfg.regions[c.target].d_input) for c in cfg.connections],
        "obs_proj": init_linear(cfg.raw_obs_dim, cfg.regions[0].d_input),
        "global_decay": np.ones(n_gs, np.float32),
        "output_proj": init_linear(n_gs, cfg.out_dims),
    }
    if cfg.exit_strategy.kind == "adaptive_gate":
        params["outer_exit_gate"] = init_linear(n_gs, 1)
    if cfg.extra_heads:
        params["extra_heads"] = [init_linear(n_gs, cfg.out_dims) for _ in range(N_EXTRA_HEADS)]
    if cfg.router is not None:
        params["router"] = init_router(cfg)

    buffers = {
        "regions": [b for _, b in regions],
        "global_left": global_left,
        "global_right": global_right,
    }
    return params, buffers
