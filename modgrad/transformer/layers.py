"""Qwen2 building blocks written with modgrad ops: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Every function runs eagerly on numpy arrays or records into a compiled program. Activations are
(B, T, ...), where B and T may be symbolic. A layer's key/value cache is stored sequence-first,
(L, B, n_kv, head_dim), so the first L rows of a host buffer are one contiguous array.

A layer's weights use the (in, out) layout, y = x @ W, with q/k/v fused into one matrix and gate/up
into another (the loader builds both from the checkpoint's separate [out, in] tensors):

    ln1 (D,)  qkv_w (D, Q + 2K)  qkv_b (Q + 2K,)  o_w (Q, D)  ln2 (D,)  gate_up_w (D, 2I)  down_w (I, D)

with Q = n_heads * head_dim and K = n_kv * head_dim.
"""

from __future__ import annotations

import numpy as np

from modgrad import ops
from modgrad.transformer.config import Qwen2Config

def rms_norm(x, weight, eps: float):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    return ops.rms_norm(x, weight, eps)


def inverse_frequencies(cfg: Qwen2Config) -> np.ndarray:
    """theta^(-2i/head_dim) for i < head_dim/2, rounded to float32 as transformers does."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    return (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)  # (head_dim/2,)


def rotary_tables(positions, cfg: Qwen2Config):
    """cos and sin of position * frequency, each (T, head_dim); positions is (T,) int64."""
    angles = ops.expand_dims(ops.cast(positions, np.float32), -1) * inverse_frequencies(cfg)  # (T, hd/2)
    angles = ops.concat([angles, angles], axis=-1)  # (T, hd)
    return ops.cos(angles), ops.sin(angles)


def apply_rotary(x, cos, sin):
    """Rotate (x_i, x_{i+hd/2}) pairs by the position angle (rotate-half convention); x is (B, T, n, hd)."""
    half = ops.shape_of(x)[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    rotated = ops.concat([-x2, x1], axis=-1)
    cos = ops.expand_dims(cos, 1)  # (T, 1, hd)
    sin = ops.expand_dims(sin, 1)
    return x * cos + rotated * sin


def project_qkv(layer: dict, x, cos, sin, cfg: Qwen2Config, matmul=ops.matmul):
    """Project and rotate: q (B, T, n_heads, hd), k and v (B, T, n_kv, hd)."""
    b, t = ops.shape_of(x)[:2]
    qkv = matmul(x, layer["qkv_w"]) + layer["qkv_b"]  # (B, T, Q + 2K)
    q = ops.reshape(qkv[..., : cfg.q_size], (b, t, cfg.num_attention_heads, cfg.head_dim))
    k = ops.reshape(qkv[..., cfg.q_size : cfg.q_size + cfg.kv_size], (b, t, cfg.num_key_value_heads, cfg.head_dim))
    v = ops.reshape(qkv[..., cfg.q_size + cfg.kv_size :], (b, t, cfg.num_key_value_heads, cfg.head_dim))
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def causal_attention(q, k, v, positions, cfg: Qwen2Config):
    """Softmax(q k^T / sqrt(hd)) v over the same T tokens with a causal mask; returns (B, T, Q).

    Query heads share their key/value head without copies: compiled float32 programs run the
    grouped-query Mojo kernel.
    """
    b, t = ops.shape_of(q)[:2]
    return ops.reshape(ops.causal_attention(q, k, v, positions), (b, t, cfg.q_size))


def cached_attention(q, k, v, past_k, past_v, cfg: Qwen2Config):
    """Attention of one new token to the L cached tokens and itself; returns (B, 1, Q).

    q is (B, 1, n_heads, hd), k and v (B, 1, n_kv, hd), past_k and past_v (L, B, n_kv, hd). The
    cache is read where it lies: compiled float32 programs run the grouped-query Mojo kernel.
    """
    b = ops.shape_of(q)[0]
    n_kv, hd = cfg.num_key_value_heads, cfg.head_dim
    out = ops.decode_attention(
        ops.reshape(q, (b, cfg.num_attention_heads, hd)),
        ops.reshape(k, (b, n_kv, hd)),
        ops.reshape(v, (b, n_kv, hd)),
        past_k,
        past_v,
    )  # (B, n_heads, hd)
    return ops.reshape(out, (b, 1, cfg.q_size))


def swiglu_mlp(layer: dict, x, cfg: Qwen2Config, matmul=ops.matmul):
    """down(silu(gate(x)) * up(x)); gate and up are one fused (D, 2I) matmul."""
    gate_up = matmul(x, layer["gate_up_w"])  # (B, T, 2I)
    gate = gate_up[..., : cfg.intermediate_size]
    up = gate_up[..., cfg.intermediate_size :]
    return matmul(ops.silu(gate) * up, layer["down_w"])  # (B, T, D)


def decoder_layer(layer: dict, h, cos, sin, positions, cfg: Qwen2Config):
    """One pre-norm block over T tokens; returns h and the layer's k, v as (T, B, n_kv, hd) cache rows."""
    q, k, v = project_qkv(layer, rms_norm(h, layer["ln1"], cfg.rms_norm_eps), cos, sin, cfg)
    h = h + causal_attention(q, k, v, positions, cfg) @ layer["o_w"]
    h = h + swiglu_mlp(layer, rms_norm(h, layer["ln2"], cfg.rms_norm_eps), cfg)
    return h, ops.transpose(k, (1, 0, 2, 3)), ops.transpose(v, (1, 0, 2, 3))


def decoder_layer_cached(layer: dict, h, cos, sin, past_k, past_v, cfg: Qwen2Config):
    """One block for a single new token (B, 1, D) against the cache; returns h and the new (1, B, n_kv, hd) k, v.

    Its products have only B rows each, so they use ``ops.matvec``, whose cost is one read of the weights.
    """
    q, k, v = project_qkv(layer, rms_norm(h, layer["ln1"], cfg.rms_norm_eps), cos, sin, cfg, ops.matvec)
    h = h + ops.matvec(cached_attention(q, k, v, past_k, past_v, cfg), layer["o_w"])
    h = h + swiglu_mlp(layer, rms_norm(h, layer["ln2"], cfg.rms_norm_eps), cfg, ops.matvec)
    return h, ops.transpose(k, (1, 0, 2, 3)), ops.transpose(v, (1, 0, 2, 3))
