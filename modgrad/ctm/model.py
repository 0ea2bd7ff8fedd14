"""The CTM forward pass: synapse, neuron-level models, synchronisation, attention, over ticks.

One call runs ``cfg.ticks`` internal ticks with ``mg.scan``, so the tick body is traced (and
compiled) once. Per tick, from the activated state z of the previous tick:

    s_a = action synchronisation of z          -> query q (B, Di)
    o   = attention of q over the observation  -> (B, Di)
    a   = synapse([o, z])                       -> (B, D), pushed into the trace window
    z   = NLM(trace)                            -> (B, D)
    s_o = output synchronisation of z           -> prediction = output_proj(s_o)

Every parameter gets its exact gradient through ``mg.value_and_grad``, including the decays, the
start trace and the synchronisation recurrences, which the reference's hand-written BPTT drops.
"""

from __future__ import annotations

import math

import numpy as np

from modgrad import ops
from modgrad.ctm.config import CtmConfig
from modgrad.engine.prims.control import scan

UNROLL_TICKS = 4  # tick loops up to this length are unrolled when traced


def linear(p: dict, x):
    return ops.matmul(x, p["w"]) + p["b"]


def layer_norm(p: dict, x, activation: str = "none"):
    return ops.layer_norm(x, p["g"], p["b"], eps=1e-5, activation=activation)


def synapse(p: dict, x):
    """Linear-LN-SiLU blocks; with depth > 1 a U-Net whose skip joins are LayerNormed sums."""

    def block(bp, h):
        return layer_norm(bp["ln"], linear(bp["linear"], h), activation="silu")

    h = [block(p["first"], x)]  # (B, D)
    if "down" not in p:
        return h[0]
    for bp in p["down"]:
        h.append(block(bp, h[-1]))
    cur = h[-1]
    for i in reversed(range(len(p["up"]))):
        cur = layer_norm(p["skip_ln"][i], block(p["up"][i], cur) + h[i])
    return cur  # (B, D)


def nlm(p: dict, trace):
    """Per-neuron models over the trace window. trace (D, B, M) -> activated z (B, D)."""
    h = ops.nlm_glu(trace, p["stage1"]["w"], p["stage1"]["b"])  # (D, B, H) or (D, B, 1)
    if "stage2" in p:
        h = ops.nlm_glu(h, p["stage2"]["w"], p["stage2"]["b"])  # (D, B, 1)
    return ops.transpose(ops.squeeze(h, -1), (1, 0))  # (B, D)


def pair_products(z, left: np.ndarray, right: np.ndarray):
    """z[:, L_i] * z[:, R_i] for each sync pair. z (B, D) -> (B, S)."""
    return ops.gather(z, left, axis=1) * ops.gather(z, right, axis=1)


def decay_rate(decay):
    """r = exp(-clamp(decay, 0, 15)): the per-pair forgetting factor of a sync accumulator."""
    return ops.exp(-ops.clip(decay, 0.0, 15.0))


def encode_observation(params: dict, obs):
    """Project and normalise observation tokens. obs (B, n, raw) -> kv (B, n, Di)."""
    return layer_norm(params["kv_ln"], linear(params["kv_proj"], obs))


def attention_inputs(params: dict, cfg: CtmConfig, kv):
    """Slice the query projection out of mha_in and project the observation's keys and values.

    Called once per call, outside the tick loop, so a tick's query projection is a plain linear
    layer. -> (query {"w" (Di, Di), "b" (Di,)}, K and V each (B, n, heads, dh)).
    """
    di, nh, dh = cfg.d_input, cfg.heads, cfg.head_dim
    w, b = params["mha_in"]["w"], params["mha_in"]["b"]
    k = ops.matmul(kv, w[:, di : 2 * di]) + b[di : 2 * di]  # (B, n, Di)
    v = ops.matmul(kv, w[:, 2 * di :]) + b[2 * di :]
    shape = ops.shape_of(kv)
    heads = (shape[0], shape[1], nh, dh)
    return {"w": w[:, :di], "b": b[:di]}, ops.reshape(k, heads), ops.reshape(v, heads)


def attend(params: dict, cfg: CtmConfig, query: dict, q, k, v):
    """Single-query multi-head attention. q (B, Di) over k, v (B, n, heads, dh) -> (B, Di)."""
    batch = ops.shape_of(q)[0]
    qh = ops.reshape(linear(query, q), (batch, cfg.heads, cfg.head_dim))  # (B, nh, dh)
    heads = ops.single_query_attention(qh, k, v)  # (B, nh, dh)
    return linear(params["mha_out"], ops.reshape(heads, (batch, cfg.d_input)))


# --------------------------------------------------------------------------------------------
# State and the tick loop


def init_state(params: dict, cfg: CtmConfig, batch: int | str) -> dict:
    """Build a fresh recurrent state from the learned start activation and start trace.

    trace is stored (D, B, M) so the NLM is one batched matmul per stage. ``started`` is 0 until
    the first tick has run; it switches the sync accumulators from initialisation to recurrence.
    """
    d, m = cfg.d_model, cfg.memory_length
    z = ops.broadcast_to(params["start_activated"], (batch, d))
    trace = ops.broadcast_to(ops.expand_dims(params["start_trace"], 1), (d, batch, m))
    dtype = ops.dtype_of(params["start_activated"])
    return {
        "trace": trace,  # (D, B, M)
        "z": z,  # (B, D)
        "alpha_out": ops.zeros((batch, cfg.n_synch_out), dtype),
        "beta_out": ops.ones((batch, cfg.n_synch_out), dtype),
        "alpha_action": ops.zeros((batch, cfg.n_synch_action), dtype),
        "beta_action": ops.ones((batch, cfg.n_synch_action), dtype),
        "started": ops.zeros((batch, 1), dtype),
    }


def run_ticks(params: dict, buffers: dict, cfg: CtmConfig, kv, state: dict, restart_sync: bool = False):
    """Run cfg.ticks ticks attending over kv (B, n, Di).

    restart_sync: re-initialise both sync accumulators from the incoming z, as the reference's
    inference call does; otherwise they continue from ``state`` (the training semantics, where
    a region's state is carried across a brain's outer ticks).
    Returns (state, sync_out) with sync_out (T, B, So) for every tick.
    """
    query, k, v = attention_inputs(params, cfg, kv)
    r_out = decay_rate(params["decay_out"])  # (So,)
    r_action = decay_rate(params["decay_action"])  # (Sa,)
    lo, ro = buffers["left_out"], buffers["right_out"]
    la, ra = buffers["left_action"], buffers["right_action"]

    started = state["started"] * 0.0 if restart_sync else state["started"]  # (B, 1)
    fresh = 1.0 - started
    alpha_out = started * state["alpha_out"] + fresh * pair_products(state["z"], lo, ro)
    beta_out = started * state["beta_out"] + fresh

    def tick(carry, _):
        trace, z, a_out, b_out, a_act, b_act, s = carry
        # While s is 0 (no tick has run yet) the action accumulators start from the pair products.
        a_act, b_act, s_act = ops.sync_update(z, la, ra, r_action, s * a_act, s * b_act)  # each (B, Sa)
        q = linear(params["q_proj"], s_act)  # (B, Di)
        o = attend(params, cfg, query, q, k, v)  # (B, Di)
        a = synapse(params["synapse"], ops.concat([o, z], -1))  # (B, D)
        trace = ops.trace_push(trace, ops.transpose(a, (1, 0)))  # (D, B, M)
        z = nlm(params["nlm"], trace)  # (B, D)
        a_out, b_out, s_out = ops.sync_update(z, lo, ro, r_out, a_out, b_out)  # each (B, So)
        return (trace, z, a_out, b_out, a_act, b_act, s * 0.0 + 1.0), s_out

    init = (state["trace"], state["z"], alpha_out, beta_out, state["alpha_action"], state["beta_action"], started)
    # A few ticks run unrolled: one straight-line program instead of a loop of tiny compiled calls.
    final, sync_out = scan(tick, init, length=cfg.ticks, unroll=cfg.ticks <= UNROLL_TICKS)
    trace, z, a_out, b_out, a_act, b_act, s = final
    new_state = {
        "trace": trace,
        "z": z,
        "alpha_out": a_out,
        "beta_out": b_out,
        "alpha_action": a_act,
        "beta_action": b_act,
        "started": s,
    }
    return new_state, sync_out


def certainty(logits):
    """[normalised entropy, 1 - normalised entropy] of softmax(logits) on the last axis."""
    n = ops.shape_of(logits)[-1]
    if n <= 1:
        zero = ops.sum(logits, -1, keepdims=True) * 0.0
        return ops.concat([zero, zero + 1.0], -1)
    logp = ops.log_softmax(logits, -1)
    entropy = -ops.sum(ops.exp(logp) * logp, -1, keepdims=True)
    ne = ops.clip(entropy * (1.0 / math.log(n)), 0.0, 1.0)
    return ops.concat([ne, 1.0 - ne], -1)


def ctm_forward(params: dict, buffers: dict, cfg: CtmConfig, obs, state: dict | None = None):
    """Run one CTM call on observation tokens obs (B, n, raw).

    Returns (predictions (B, T, O), certainties (B, T, 2), state). The state can be passed to the
    next call to continue thinking from where this call stopped.
    """
    batch = ops.shape_of(obs)[0]
    if state is None:
        state = init_state(params, cfg, batch)
    kv = encode_observation(params, obs)
    state, sync_out = run_ticks(params, buffers, cfg, kv, state)
    preds = ops.transpose(linear(params["output_proj"], sync_out), (1, 0, 2))  # (B, T, O)
    return preds, certainty(preds), state


def exit_probabilities(params: dict, sync_out):
    """Halting probability per tick from the adaptive exit gate. sync_out (..., So) -> (..., 1)."""
    return ops.sigmoid(linear(params["exit_gate"], sync_out))
