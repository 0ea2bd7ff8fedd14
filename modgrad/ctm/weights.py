"""Initial CTM weights as a tree of named float32 arrays, following the reference init rules.

Linear layers are stored as ``w: (in, out)`` and ``b: (out,)`` so the forward is ``x @ w + b``.
Every Linear with the same (in, out) pair starts identical (its RNG is seeded with in XOR out),
as in the reference; symmetry is broken by the inputs.
"""

from __future__ import annotations

import numpy as np

from modgrad.ctm.config import CtmConfig
from modgrad.ctm.rng import SimpleRng


def init_linear(n_in: int, n_out: int) -> dict[str, np.ndarray]:
    """Kaiming-normal weights sqrt(2/in), zero bias."""
    rng = SimpleRng(n_in ^ n_out)
    w = rng.normal(n_in * n_out).reshape(n_out, n_in) * np.float32(np.sqrt(2.0 / max(n_in, 1)))
    return {"w": np.ascontiguousarray(w.T, dtype=np.float32), "b": np.zeros(n_out, np.float32)}


def init_super_linear(n: int, n_in: int, n_out: int) -> dict[str, np.ndarray]:
    """n independent linears: w (n, in, out), b (n, out)."""
    rng = SimpleRng(n * n_in * n_out)
    w = rng.normal(n * n_in * n_out).reshape(n, n_out, n_in) * np.float32(np.sqrt(2.0 / n_in))
    return {"w": np.ascontiguousarray(w.transpose(0, 2, 1), dtype=np.float32), "b": np.zeros((n, n_out), np.float32)}


def init_layer_norm(n: int) -> dict[str, np.ndarray]:
    return {"g": np.ones(n, np.float32), "b": np.zeros(n, np.float32)}


def _block(n_in: int, n_out: int) -> dict:
    return {"linear": init_linear(n_in, n_out), "ln": init_layer_norm(n_out)}


def init_synapse(cfg: CtmConfig) -> dict:
    widths = cfg.synapse_widths
    n_in = cfg.d_input + cfg.d_model
    syn: dict = {"first": _block(n_in, widths[0])}
    if len(widths) > 1:
        syn["down"] = [_block(widths[i], widths[i + 1]) for i in range(len(widths) - 1)]
        syn["up"] = [_block(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]
        syn["skip_ln"] = [init_layer_norm(widths[i]) for i in range(len(widths) - 1)]
    return syn


def init_nlm(cfg: CtmConfig) -> dict:
    d, m, h = cfg.d_model, cfg.memory_length, cfg.memory_hidden_dims
    if cfg.deep_nlms:
        return {"stage1": init_super_linear(d, m, 2 * h), "stage2": init_super_linear(d, h, 2)}
    return {"stage1": init_super_linear(d, m, 2)}


def init_ctm(cfg: CtmConfig, raw_input_dim: int | None = None, seed: int = 42) -> tuple[dict, dict]:
    """Return (params, buffers). Buffers hold the fixed sync pair indices, which are not trained.

    raw_input_dim: feature width of the observation tokens fed to ``kv_proj`` (defaults to d_input).
    """
    raw = cfg.d_input if raw_input_dim is None else raw_input_dim
    d, m, di = cfg.d_model, cfg.memory_length, cfg.d_input
    so, sa = cfg.n_synch_out, cfg.n_synch_action

    rng = SimpleRng(seed)
    start_activated = ((2 * rng.uniform(d) - 1) / np.sqrt(d)).astype(np.float32)
    start_trace = ((2 * rng.uniform(d * m) - 1) / np.sqrt(m)).astype(np.float32).reshape(d, m)
    left_out, right_out = rng.below(so, d), rng.below(so, d)
    right_out[: cfg.n_random_pairing_self] = left_out[: cfg.n_random_pairing_self]
    left_action, right_action = rng.below(sa, d), rng.below(sa, d)
    k = min(cfg.n_random_pairing_self, sa)
    right_action[:k] = left_action[:k]

    params = {
        "synapse": init_synapse(cfg),
        "nlm": init_nlm(cfg),
        "start_activated": start_activated,
        "start_trace": start_trace,
        "kv_proj": init_linear(raw, di),
        "kv_ln": init_layer_norm(di),
        "q_proj": init_linear(sa, di),
        "mha_in": init_linear(di, 3 * di),
        "mha_out": init_linear(di, di),
        "decay_out": np.ones(so, np.float32),
        "decay_action": np.ones(sa, np.float32),
        "output_proj": init_linear(so, cfg.out_dims),
    }
    if cfg.has_exit_gate:
        params["exit_gate"] = init_linear(so, 1)
    buffers = {
        "left_out": left_out,
        "right_out": right_out,
        "left_action": left_action,
        "right_action": right_action,
    }
    return params, buffers


def count_params(tree) -> int:
    from modgrad.engine.pytree import tree_flatten

    return int(sum(np.size(leaf) for leaf in tree_flatten(tree)[0]))
