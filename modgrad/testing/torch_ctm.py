"""A PyTorch implementation of the same CTM, written independently of the engine.

Two uses: the autograd oracle for our gradients (tests), and the PyTorch-eager peer in
``bench/ctm_train.py``. It reads the same parameter tree as ``modgrad.ctm`` (w stored (in, out)).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from modgrad.ctm.config import CtmConfig


def to_torch(tree, dtype=torch.float32, requires_grad: bool = True):
    if isinstance(tree, dict):
        return {k: to_torch(v, dtype, requires_grad) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_torch(v, dtype, requires_grad) for v in tree]
    return torch.tensor(np.asarray(tree), dtype=dtype, requires_grad=requires_grad)


def from_torch_grads(tree):
    if isinstance(tree, dict):
        return {k: from_torch_grads(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [from_torch_grads(v) for v in tree]
    return None if tree.grad is None else tree.grad.detach().numpy()


def leaves(tree) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in leaves(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in leaves(v)]
    return [tree]


def _linear(p, x):
    return x @ p["w"] + p["b"]


def _ln(p, x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], p["g"], p["b"], eps=1e-5)


def _synapse(p, x):
    def block(bp, h):
        return torch.nn.functional.silu(_ln(bp["ln"], _linear(bp["linear"], h)))

    hs = [block(p["first"], x)]
    if "down" not in p:
        return hs[0]
    for bp in p["down"]:
        hs.append(block(bp, hs[-1]))
    cur = hs[-1]
    for i in reversed(range(len(p["up"]))):
        cur = _ln(p["skip_ln"][i], block(p["up"][i], cur) + hs[i])
    return cur


def _glu(x):
    k = x.shape[-1] // 2
    return x[..., :k] * torch.sigmoid(x[..., k:])


def _nlm(p, trace):  # trace (B, D, M)
    h = _glu(torch.einsum("bdm,dmo->bdo", trace, p["stage1"]["w"]) + p["stage1"]["b"])
    if "stage2" in p:
        h = _glu(torch.einsum("bdh,dho->bdo", h, p["stage2"]["w"]) + p["stage2"]["b"])
    return h[..., 0]


def ctm_forward(p: dict, buffers: dict, cfg: CtmConfig, obs: torch.Tensor) -> torch.Tensor:
    """obs (B, n, raw) -> predictions (B, T, O), from a fresh state."""
    batch = obs.shape[0]
    di, nh, dh = cfg.d_input, cfg.heads, cfg.head_dim
    lo, ro = torch.as_tensor(buffers["left_out"]), torch.as_tensor(buffers["right_out"])
    la, ra = torch.as_tensor(buffers["left_action"]), torch.as_tensor(buffers["right_action"])

    kv = _ln(p["kv_ln"], _linear(p["kv_proj"], obs))
    w, b = p["mha_in"]["w"], p["mha_in"]["b"]
    k = (kv @ w[:, di : 2 * di] + b[di : 2 * di]).view(batch, -1, nh, dh).transpose(1, 2)
    v = (kv @ w[:, 2 * di :] + b[2 * di :]).view(batch, -1, nh, dh).transpose(1, 2)
    r_out = torch.exp(-torch.clamp(p["decay_out"], 0, 15))
    r_act = torch.exp(-torch.clamp(p["decay_action"], 0, 15))

    z = p["start_activated"].expand(batch, -1)
    trace = p["start_trace"].expand(batch, -1, -1)
    a_out, b_out = z[:, lo] * z[:, ro], torch.ones(batch, cfg.n_synch_out, dtype=z.dtype)
    a_act = b_act = None
    preds = []
    for t in range(cfg.ticks):
        pair = z[:, la] * z[:, ra]
        if t == 0:
            a_act, b_act = pair, torch.ones_like(pair)
        else:
            a_act, b_act = r_act * a_act + pair, r_act * b_act + 1
        q = _linear(p["q_proj"], a_act / torch.sqrt(b_act))
        qh = (q @ w[:, :di] + b[:di]).view(batch, nh, 1, dh)
        att = torch.softmax(qh @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v
        o = _linear(p["mha_out"], att.reshape(batch, di))
        a = _synapse(p["synapse"], torch.cat([o, z], -1))
        trace = torch.cat([trace[:, :, 1:], a[:, :, None]], -1)
        z = _nlm(p["nlm"], trace)
        a_out, b_out = r_out * a_out + z[:, lo] * z[:, ro], r_out * b_out + 1
        preds.append(_linear(p["output_proj"], a_out / torch.sqrt(b_out)))
    return torch.stack(preds, 1)
