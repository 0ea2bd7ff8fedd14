"""The brain forward pass: K outer ticks over CTM regions, a global sync readout, one prediction per tick.

Per outer tick, every region reads the previous outer tick's region outputs (a Jacobi update, so
region order does not matter):

    x_r  = sum of Linear(concat(source outputs (+ observation))) over connections into r
           (obs_proj(observation) for a region without connections; router presets route instead)
    z_r  = run_ticks(region r, x_r as one observation token)       -> (B, D_r)
    A    = concat(z_0 .. z_{n-1})                                   -> (B, sum D)
    alpha = rho * alpha + A[L] * A[R];  beta = rho * beta + 1       -> global sync gs = alpha / sqrt(beta)
    logits_k = output_proj(gs)                                      -> (B, out_dims)

A spatial region (``RegionalConfig.spatial_regions``) instead attends over every token of a
token-set observation (B, n, raw), for example the cells of an image, plus one token that
carries x_r when connections feed it.

Gradients are exact through everything: edges into their source regions, the router, the global
sync recurrence and its decays, the region states across outer ticks and, when the caller carries
the state, across tokens. The reference's hand-written backward drops all of those.
``truncate_gradients=True`` drops them too, for comparisons with it: the state handed to the next
outer tick carries no gradient.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from modgrad import ops
from modgrad.ctm.model import decay_rate, encode_observation, init_state, layer_norm, linear, pair_products, run_ticks
from modgrad.engine.pytree import tree_map
from modgrad.graph.config import RegionalConfig

# Outer loops this short run as a Python loop (fewer nested scans); longer ones use ops.scan.
MAX_UNROLLED_OUTER_TICKS = 4


def init_brain_state(params: dict, cfg: RegionalConfig, batch: int | str) -> dict:
    """Fresh state: every region at its start state, global sync alpha = 0 and beta = 1.

    Built from ``params`` with ops, so gradients reach the start activations and start traces.
    """
    dtype = ops.dtype_of(params["global_decay"])
    return {
        "regions": [init_state(p, rc, batch) for p, rc in zip(params["regions"], cfg.regions)],
        "global_alpha": ops.zeros((batch, cfg.n_global_sync), dtype),  # (B, S)
        "global_beta": ops.ones((batch, cfg.n_global_sync), dtype),  # (B, S)
    }


def global_sync(state: dict):
    """Current global synchronisation alpha / sqrt(beta). -> (B, n_global_sync)."""
    return state["global_alpha"] * ops.rsqrt(state["global_beta"])


# --------------------------------------------------------------------------------------------
# Region inputs


def connection_inputs(params: dict, cfg: RegionalConfig, obs, outputs: list) -> list:
    """Input of every region from the fixed connections. obs (B, raw), outputs[r] (B, D_r) -> [(B, Di_r)]."""
    received: list = [None] * cfg.n_regions
    for conn, edge in zip(cfg.connections, params["edges"]):
        parts = [outputs[s] for s in conn.sources]
        if conn.receives_observation:
            start, length = cfg.obs_slice(conn.observation_scale)
            parts.append(obs if length == cfg.raw_obs_dim else ops.slice_axis(obs, -1, start, start + length))
        x = linear(edge, ops.concat(parts, -1))  # (B, Di_target)
        received[conn.target] = x if received[conn.target] is None else received[conn.target] + x

    missing = [r for r in range(cfg.n_regions) if received[r] is None and r not in cfg.spatial_regions]
    if missing:
        projected = linear(params["obs_proj"], obs)  # (B, Di_0)
        for r in missing:
            received[r] = projected
    return received


def top_k_mask(weights, k: int, axis: int):
    """1.0 at the k largest entries along ``axis``, 0.0 elsewhere; carries no gradient."""
    n = ops.shape_of(weights)[axis]
    scores = ops.stop_gradient(weights)
    mask = scores * 0.0
    perm = [i for i in range(len(ops.shape_of(weights))) if i != axis] + [axis]
    inverse = [perm.index(i) for i in range(len(perm))]
    for _ in range(min(k, n)):
        best = ops.argmax(ops.where(ops.greater(mask, 0.5), -1e30, scores), axis=axis)
        picked = ops.transpose(ops.one_hot(best, n, ops.dtype_of(weights)), inverse)
        mask = mask + picked
    return mask


def routed_inputs(params: dict, cfg: RegionalConfig, obs, outputs: list, gs, tick_embed):
    """Input of every region from the learned router. gs (B, S), tick_embed (E,) -> [(B, Di_r)].

    Destination j reads sum_{i in top-k} w_ij * to_route_i(z_i), where w_ij is a softmax over
    sources i of route_proj([gs; tick_embed]). The weights are not renormalised after the top-k.
    """
    rp, rc, n = params["router"], cfg.router, cfg.n_regions
    batch = ops.shape_of(gs)[0]
    embed = ops.broadcast_to(tick_embed, (batch, rc.tick_embed_dim))  # (B, E)
    logits = ops.reshape(linear(rp["route_proj"], ops.concat([gs, embed], -1)), (batch, n, n))  # (B, src, dst)

    # Softmax over sources with the exponent floored at -30, as the reference does.
    shifted = logits - ops.stop_gradient(ops.max(logits, 1, keepdims=True))
    e = ops.exp(ops.maximum(shifted, -30.0))
    weights = e / ops.sum(e, 1, keepdims=True)  # (B, src, dst)
    weights = weights * top_k_mask(weights, rc.k, axis=1)

    messages = ops.stack([linear(rp["to_route"][i], outputs[i]) for i in range(n)], 1)  # (B, src, d_route)
    routed = ops.matmul(ops.transpose(weights, (0, 2, 1)), messages)  # (B, dst, d_route)
    inputs = [linear(rp["from_route"][j], routed[:, j]) for j in range(n)]  # [(B, Di_j)]
    if rc.observe_input:
        inputs[0] = inputs[0] + linear(params["obs_proj"], obs)
    return inputs


# --------------------------------------------------------------------------------------------
# Outer ticks


def outer_tick(params: dict, buffers: dict, cfg: RegionalConfig, obs, state: dict, tick_embed, restart_sync: bool,
               spatial_kv: dict | None = None, output_offsets: dict | None = None, truncate_gradients: bool = False):
    """Run every region for one outer tick, then update the global sync. -> (state, logits (B, out_dims)).

    spatial_kv maps each spatial region to its encoded observation tokens (B, n, Di). A spatial
    region with an input from other regions attends over those tokens plus that input as one more
    token. The input is already a learned projection, so it passes through the region's kv_ln only.

    output_offsets maps a region to a (B, D_r) value added to its output where other parts of the
    brain read it: the connection (or router) inputs and the global sync. The region's own state
    does not include it.

    truncate_gradients: return the state without its gradient, so the loss of a later outer tick
    does not reach this tick's computation (through the edges, the router, the global sync
    recurrence or the region states).
    """
    spatial_kv = spatial_kv or {}
    offsets = output_offsets or {}

    def region_output(r: int, region_state: dict):
        return region_state["z"] + offsets[r] if r in offsets else region_state["z"]

    outputs = [region_output(r, s) for r, s in enumerate(state["regions"])]
    if cfg.router is None:
        inputs = connection_inputs(params, cfg, obs, outputs)
    else:
        inputs = routed_inputs(params, cfg, obs, outputs, global_sync(state), tick_embed)

    regions = []
    for r, (p, b, rc, x, s) in enumerate(zip(params["regions"], buffers["regions"], cfg.regions, inputs, state["regions"])):
        if r not in spatial_kv:
            kv = encode_observation(p, ops.expand_dims(x, 1))  # (B, 1, Di)
        elif x is None:
            kv = spatial_kv[r]  # (B, n, Di)
        else:
            kv = ops.concat([spatial_kv[r], ops.expand_dims(layer_norm(p["kv_ln"], x), 1)], 1)  # (B, n + 1, Di)
        s, _ = run_ticks(p, b, rc, kv, s, restart_sync=restart_sync)
        regions.append(s)

    activations = ops.concat([region_output(r, s) for r, s in enumerate(regions)], -1)  # (B, sum D)
    rho = decay_rate(params["global_decay"])  # (S,)
    alpha = rho * state["global_alpha"] + pair_products(activations, buffers["global_left"], buffers["global_right"])
    beta = rho * state["global_beta"] + 1.0
    new_state = {"regions": regions, "global_alpha": alpha, "global_beta": beta}
    logits = linear(params["output_proj"], global_sync(new_state))
    if truncate_gradients:
        new_state = tree_map(ops.stop_gradient, new_state)
    return new_state, logits


@functools.lru_cache(maxsize=16)
def spatial_position_code(n_tokens: int, dim: int) -> np.ndarray:
    """Fixed 2-D sinusoidal position code (n_tokens, dim), float32, read-only.

    Tokens lie on a grid round(sqrt(n_tokens)) wide in row-major order. The first half of the
    channels codes the row and the second half the column: channel c of a half codes position x
    as sin(x f_c) for even c and cos(x f_c) for odd c, with f_c = 1 / 10000^(2 (c // 2) / half).
    """
    half = dim // 2
    width = max(int(round(math.sqrt(n_tokens))), 1)
    index = np.arange(n_tokens)
    rows, cols = (index // width).astype(np.float64), (index % width).astype(np.float64)
    c = np.arange(half)
    freq = 1.0 / 10000.0 ** (2.0 * (c // 2) / max(half, 1))  # (half,)

    def code(x):
        angle = x[:, None] * freq[None, :]  # (n, half)
        return np.where(c % 2 == 0, np.sin(angle), np.cos(angle))

    out = np.concatenate([code(rows), code(cols)], -1).astype(np.float32)  # (n, dim)
    out.setflags(write=False)
    return out


def split_observation(params: dict, cfg: RegionalConfig, obs):
    """Check an observation and return (flat obs (B, raw), {spatial region: kv (B, n, Di)}).

    A flat brain takes obs (B, raw_obs_dim). A spatial brain takes tokens (B, spatial_tokens,
    raw_obs_dim): its spatial regions encode all of them, and flat consumers read token 0.
    """
    shape = ops.shape_of(obs)
    if not cfg.is_spatial:
        if len(shape) != 2:
            raise ValueError(f"observation shape {tuple(shape)} is not (B, raw_obs_dim); this brain takes one vector per example")
        if shape[-1] != cfg.raw_obs_dim:
            raise ValueError(f"observation width {shape[-1]} does not match the brain's raw_obs_dim {cfg.raw_obs_dim}")
        return obs, {}
    if len(shape) != 3 or shape[1] != cfg.spatial_tokens or shape[2] != cfg.raw_obs_dim:
        raise ValueError(
            f"observation shape {tuple(shape)} does not match the spatial brain's "
            f"(B, {cfg.spatial_tokens}, {cfg.raw_obs_dim}): pass the whole token set"
        )
    tokens = obs
    if cfg.spatial_position_code:
        tokens = obs + spatial_position_code(cfg.spatial_tokens, cfg.raw_obs_dim).astype(ops.dtype_of(obs))
    kv = {r: encode_observation(params["regions"][r], tokens) for r in cfg.spatial_regions}  # (B, n, Di_r)
    return obs[:, 0], kv


def brain_step(params: dict, buffers: dict, cfg: RegionalConfig, obs, state: dict, restart_sync: bool = False,
               output_offsets: dict | None = None, truncate_gradients: bool = False):
    """Run cfg.outer_ticks outer ticks on one observation.

    obs: (B, raw_obs_dim), or (B, spatial_tokens, raw_obs_dim) tokens for a spatial brain.
    restart_sync: re-initialise every region's sync accumulators at each region call (the
    reference's inference semantics); by default they continue across outer ticks and calls.
    output_offsets: {region: (B, D_r)} added to region outputs at every outer tick (see outer_tick).
    truncate_gradients: cut the gradient between outer ticks, as the reference's backward does:
    each outer tick's loss trains the regions only through that tick's readout (see outer_tick).
    Returns (logits (B, K, out_dims), new_state).
    """
    obs, spatial_kv = split_observation(params, cfg, obs)
    k = cfg.outer_ticks
    tick_embeds = params["router"]["tick_embed"] if cfg.router is not None else None  # (K, E)

    if k <= MAX_UNROLLED_OUTER_TICKS:
        logits = []
        for t in range(k):
            embed = tick_embeds[t] if tick_embeds is not None else None
            state, pred = outer_tick(params, buffers, cfg, obs, state, embed, restart_sync, spatial_kv, output_offsets,
                                     truncate_gradients)
            logits.append(pred)
        return ops.stack(logits, 1), state

    def body(carry, embed):
        return outer_tick(params, buffers, cfg, obs, carry, embed, restart_sync, spatial_kv, output_offsets,
                          truncate_gradients)

    state, logits = ops.scan(body, state, xs=tick_embeds, length=None if tick_embeds is not None else k)
    return ops.transpose(logits, (1, 0, 2)), state  # (B, K, out_dims)


def embed_tokens(params: dict, tokens):
    """Look up token embeddings. tokens (B, L) int -> (B, L, raw_obs_dim)."""
    return ops.gather(params["embeddings"], tokens, axis=0)


def brain_forward_tokens(params: dict, buffers: dict, cfg: RegionalConfig, tokens, state: dict | None = None,
                         remat: bool = False):
    """Run the brain over a token window, carrying its state from token to token.

    tokens (B, L) int64. Gradients flow through the whole window (backpropagation through time
    over tokens, outer ticks and region ticks). ``state`` defaults to a fresh state.
    A traced gradient keeps every intermediate of the window in memory. ``remat=True`` keeps only
    each token's incoming state and recomputes the token's forward pass during the backward pass.
    Returns (logits (B, L, K, out_dims), final state).
    """
    if cfg.is_spatial:
        raise ValueError(f"brain {cfg.name!r} takes token-set observations; call brain_step with (B, n, raw) tokens")
    if state is None:
        state = init_brain_state(params, cfg, ops.shape_of(tokens)[0])
    obs = ops.transpose(embed_tokens(params, tokens), (1, 0, 2))  # (L, B, raw)

    def body(carry, obs_t):
        logits, carry = brain_step(params, buffers, cfg, obs_t, carry)
        return carry, logits

    state, logits = ops.scan(body, state, xs=obs, remat=remat)  # logits (L, B, K, out_dims)
    return ops.transpose(logits, (1, 0, 2, 3)), state
