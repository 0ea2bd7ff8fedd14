"""Numpy oracles of the Mojo kernels: the definitions the kernels are tested against.

Each function computes in the dtype of its inputs, so passing float64 copies of float32 data
gives a reference whose own rounding is far below the float32 tolerances of the tests.
"""

from __future__ import annotations

import numpy as np


def sync_update(
    z: np.ndarray,  # (B, D)
    left: np.ndarray,  # (S,) int
    right: np.ndarray,  # (S,) int
    decay: np.ndarray,  # (S,)
    alpha: np.ndarray,  # (B, S)
    beta: np.ndarray,  # (B, S)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(alpha', beta', sync)``: the decayed pair accumulators and their normalised ratio."""
    alpha_new = decay * alpha + z[:, left] * z[:, right]
    beta_new = decay * beta + 1
    return alpha_new, beta_new, alpha_new / np.sqrt(beta_new)


def sync_update_backward(
    z: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    decay: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    grad_alpha: np.ndarray,  # (B, S) gradient on alpha'
    grad_beta: np.ndarray,  # (B, S) gradient on beta'
    grad_sync: np.ndarray,  # (B, S) gradient on sync
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(d_z, d_decay, d_alpha, d_beta)`` of :func:`sync_update`."""
    alpha_new, beta_new, sync = sync_update(z, left, right, decay, alpha, beta)
    total_alpha = grad_alpha + grad_sync / np.sqrt(beta_new)
    total_beta = grad_beta - grad_sync * sync / (2 * beta_new)
    d_decay = (total_alpha * alpha + total_beta * beta).sum(axis=0)
    d_z = np.zeros_like(z)
    np.add.at(d_z, (slice(None), left), total_alpha * z[:, right])
    np.add.at(d_z, (slice(None), right), total_alpha * z[:, left])
    return d_z, d_decay, decay * total_alpha, decay * total_beta


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def nlm_pre_activations(trace: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Return ``einsum("bdm,dmo->bdo", trace, weight) + bias``, shape (B, D, 2H)."""
    return np.einsum("bdm,dmo->bdo", trace, weight) + bias


def nlm_forward(
    trace: np.ndarray,  # (B, D, M)
    weight: np.ndarray,  # (D, M, 2H)
    bias: np.ndarray,  # (D, 2H)
) -> np.ndarray:
    """Return the per-neuron GLU output ``pre[..., :H] * sigmoid(pre[..., H:])``, (B, D, H)."""
    pre = nlm_pre_activations(trace, weight, bias)
    hidden = pre.shape[-1] // 2
    return pre[..., :hidden] * _sigmoid(pre[..., hidden:])


def nlm_backward(
    trace: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    grad_output: np.ndarray,  # (B, D, H)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(d_trace, d_weight, d_bias)`` of :func:`nlm_forward`."""
    pre = nlm_pre_activations(trace, weight, bias)
    hidden = pre.shape[-1] // 2
    value, gate = pre[..., :hidden], _sigmoid(pre[..., hidden:])
    d_pre = np.concatenate(
        [grad_output * gate, grad_output * value * gate * (1 - gate)], axis=-1
    )  # (B, D, 2H)
    d_trace = np.einsum("bdo,dmo->bdm", d_pre, weight)
    d_weight = np.einsum("bdm,bdo->dmo", trace, d_pre)
    return d_trace, d_weight, d_pre.sum(axis=0)


def matvec(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Return ``x (B, K) @ w (K, N)``."""
    return x @ w


def adamw_fused(
    param: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    clip_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(param', m', v')`` after one AdamW step, in torch.optim.AdamW's operation order."""
    dtype = param.dtype.type
    g = grad * dtype(clip_scale)
    m_new = m + dtype(1 - beta1) * (g - m)
    v_new = v * dtype(beta2) + dtype(1 - beta2) * (g * g)
    decayed = param * dtype(1 - lr * weight_decay)
    step_size = dtype(lr / (1 - beta1**step))
    denom = np.sqrt(v_new) / dtype(np.sqrt(1 - beta2**step)) + dtype(eps)
    return decayed - step_size * (m_new / denom), m_new, v_new


def mha_single_query(
    q: np.ndarray,  # (B, H, dh)
    k: np.ndarray,  # (B, n, H, dh)
    v: np.ndarray,  # (B, n, H, dh)
) -> np.ndarray:
    """Return ``softmax(q . k / sqrt(dh)) v`` per batch row and head, (B, H, dh)."""
    scores = np.einsum("bhd,bnhd->bhn", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhn,bnhd->bhd", weights, v)



def decode_attention(
    q: np.ndarray,  # (B, H, dh)
    k: np.ndarray,  # (B, H_kv, dh), the new token
    v: np.ndarray,  # (B, H_kv, dh)
    past_k: np.ndarray,  # (L, B, H_kv, dh), the cache
    past_v: np.ndarray,  # (L, B, H_kv, dh)
) -> np.ndarray:
    """Return one token's attention over the cache and itself; query head h reads key/value head h // G."""
    group = q.shape[1] // k.shape[1]
    keys = np.repeat(np.concatenate([past_k.transpose(1, 0, 2, 3), k[:, None]], axis=1), group, axis=2)
    values = np.repeat(np.concatenate([past_v.transpose(1, 0, 2, 3), v[:, None]], axis=1), group, axis=2)
    return mha_single_query(q, keys, values)  # keys, values (B, L + 1, H, dh)


def causal_attention(
    q: np.ndarray,  # (B, T, H, dh)
    k: np.ndarray,  # (B, T, H_kv, dh)
    v: np.ndarray,  # (B, T, H_kv, dh)
    positions: np.ndarray,  # (T,) integers
) -> np.ndarray:
    """Return causal attention (B, T, H, dh): query t attends to key j where positions[j] <= positions[t]."""
    group = q.shape[2] // k.shape[2]
    keys, values = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # (B, T, H, dh)
    scores = np.einsum("bthd,bjhd->bhtj", q, keys) / np.sqrt(q.shape[-1])
    scores = np.where(positions[:, None] >= positions[None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhtj,bjhd->bthd", weights, values)
