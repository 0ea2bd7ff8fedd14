"""Optimisers, global-norm clipping and learning-rate schedules written with ``modgrad.ops``.

Every optimiser is a pure function over parameter trees (nested dicts and lists of float arrays):
it runs eagerly on numpy arrays and records into the program under ``mg.compile``. The moments, the
step count and an ``lr`` override are arrays too, so one compiled train step serves every update and
every point of a schedule::

    opt = AdamW(lr=3e-4)
    state = opt.init(params)
    loss, grads = mg.value_and_grad(loss_fn)(params, batch)
    grads, norm = clip_by_global_norm(grads, 1.0)
    lr = linear_warmup_cosine(state["step"], 3e-4, warmup_steps=100, total_steps=10_000)
    params, state = opt.update(params, grads, state, lr=lr)

The reference Rust system's RegionalAdamW clips by scaling the learning rate instead of the
gradients, updates some tensor groups with plain SGD and never updates others. The default path
here is standard AdamW on globally clipped gradients; ``ReferenceRegionalAdamW`` reproduces the
reference rule for comparisons.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from modgrad import ops
from modgrad.engine.pytree import tree_flatten, tree_unflatten

__all__ = [
    "SGD", "Adam", "AdamW", "ReferenceRegionalAdamW", "clip_by_global_norm", "default_decay_mask",
    "global_norm", "linear_warmup_cosine", "tree_paths",
]

DecayMask = Callable[[str, Any], bool]

# Step counts are int32 (exact up to 2**31 - 1 updates) and a graph input like any other array.
STEP_DTYPE = np.int32


# --------------------------------------------------------------------------------------------
# Trees and paths


def tree_paths(tree) -> list[str]:
    """Return one "/"-joined key path per leaf, e.g. "synapse/0/w", in ``tree_flatten`` order."""
    paths: list[str] = []
    _collect_paths(tree, "", paths)
    return paths


def _collect_paths(tree, prefix: str, paths: list[str]) -> None:
    if tree is None:
        return
    if isinstance(tree, dict):
        for key in sorted(tree):
            _collect_paths(tree[key], f"{prefix}{key}/", paths)
    elif isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        for i, child in enumerate(tree):
            _collect_paths(child, f"{prefix}{i}/", paths)
    else:
        paths.append(prefix[:-1])


def _flatten_like(tree, treedef, name: str, params) -> list:
    """Flatten ``tree``, which must have the parameter tree's structure."""
    leaves, other = tree_flatten(tree)
    if other != treedef:
        want, got = set(tree_paths(params)), set(tree_paths(tree))
        raise ValueError(
            f"{name} does not match the parameter tree: missing {sorted(want - got)[:5]}, "
            f"unexpected {sorted(got - want)[:5]}; pass {name} computed for these parameters"
        )
    return leaves


def _flatten_params(params) -> tuple[list, Any, list[str]]:
    leaves, treedef = tree_flatten(params)
    paths = tree_paths(params)
    for path, leaf in zip(paths, leaves):
        if not np.issubdtype(ops.dtype_of(leaf), np.floating):
            raise TypeError(
                f"parameter {path!r} has dtype {ops.dtype_of(leaf)}; optimisers update float arrays only, "
                f"so keep integer buffers out of the parameter tree"
            )
    return leaves, treedef, paths


def _zeros_like(tree):
    leaves, treedef = tree_flatten(tree)
    return tree_unflatten(treedef, [ops.zeros(ops.shape_of(x), ops.dtype_of(x)) for x in leaves])


# Scalar arithmetic runs on shape (1,) and results are reshaped back at the end.


def _const(value, dtype) -> np.ndarray:
    """Build a (1,) constant of ``dtype``; an explicit dtype, because 0-d operands are not coerced."""
    return np.asarray([value], dtype)


def _scalar(value, dtype):
    """Convert a learning rate or other scalar (float, 0-d or (1,) array, traced value) to a (1,) value of ``dtype``."""
    if isinstance(value, (int, float)):
        return _const(value, dtype)
    if ops.shape_of(value) not in ((), (1,)):
        raise ValueError(f"expected a scalar, got shape {ops.shape_of(value)}; pass a 0-d array or a float")
    return ops.reshape(ops.cast(value, dtype), (1,))


def _keep_shape(x, like):
    """Undo the (1,) broadcast that scalar arithmetic gives 0-d leaves."""
    return ops.reshape(x, ops.shape_of(like))


def _check_hyper(name: str, value: float, low: float, high: float = math.inf, high_open: bool = False) -> None:
    bad = not low <= value <= high or (high_open and value == high)
    if bad:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is invalid; expected a value in [{low}, {high}{bracket}")


# --------------------------------------------------------------------------------------------
# Weight-decay masks

_NORM_TOKEN = re.compile(r"ln\d*|\w*norm\d*")
_NO_DECAY_LEAF = re.compile(r"b\d*|bias\d*|g|gamma|beta")


def default_decay_mask(path: str, array) -> bool:
    """Decide whether AdamW decays a parameter: yes for weights of rank >= 2, no for the rest.

    No decay for 0-d and 1-D tensors. No decay for biases and norm scales or shifts either: a last
    key named b, bias, g, gamma or beta, or containing such a "_"-separated token. Anything under a
    key with a norm token (ln, ln1, norm, layernorm, ...) is not decayed, so batched biases and
    norms of shape (R, D) are excluded by name.
    """
    if len(ops.shape_of(array)) < 2:
        return False
    keys = path.split("/")
    if any(_NO_DECAY_LEAF.fullmatch(token) for token in keys[-1].split("_")):
        return False
    return not any(_NORM_TOKEN.fullmatch(token) for key in keys for token in key.split("_"))


# --------------------------------------------------------------------------------------------
# Clipping


def global_norm(tree):
    """Return the L2 norm of all leaves together as a 0-d value (at least float32)."""
    leaves = tree_flatten(tree)[0]
    if not leaves:
        raise ValueError("global_norm needs at least one array; the tree has no leaves")
    dtype = np.result_type(np.float32, *[ops.dtype_of(x) for x in leaves])
    total = None
    for x in leaves:
        part = ops.sum(ops.square(ops.cast(x, dtype)))
        total = part if total is None else ops.add(total, part)
    return ops.sqrt(total)


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by ``min(1, max_norm / (norm + 1e-6))``; return (clipped grads, norm before clipping).

    The 1e-6 and the returned pre-clip norm follow ``torch.nn.utils.clip_grad_norm_``. ``max_norm``
    may be a float or a traced scalar.
    """
    if isinstance(max_norm, (int, float)) and max_norm <= 0:
        raise ValueError(f"max_norm={max_norm!r} is invalid; expected a positive number")
    norm = global_norm(grads)
    dtype = ops.dtype_of(norm)
    scale = ops.div(_scalar(max_norm, dtype), ops.add(_scalar(norm, dtype), _const(1e-6, dtype)))  # (1,)
    scale = ops.minimum(scale, _const(1.0, dtype))
    leaves, treedef = tree_flatten(grads)
    clipped = [_keep_shape(ops.mul(g, ops.cast(scale, ops.dtype_of(g))), g) for g in leaves]
    return tree_unflatten(treedef, clipped), norm


# --------------------------------------------------------------------------------------------
# Schedules


def linear_warmup_cosine(step, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
    """Return the learning rate at ``step``: linear warmup, then cosine decay to ``min_lr``.

    ``lr = base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)``, so the rate stays at
    ``min_lr`` after ``total_steps``. ``step`` may be a number (float64 result), an integer array or
    traced value (float32 result) or a float one (its own dtype), so a compiled step reads it as an input.
    """
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps!r}, total_steps={total_steps!r} are invalid; "
            f"expected 0 <= warmup_steps <= total_steps"
        )
    if isinstance(step, (int, float)):
        step = np.asarray(step, np.float64)
    dtype = ops.dtype_of(step)
    dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)
    t = _scalar(step, dtype)  # (1,)
    c = lambda x: _const(x, dtype)  # noqa: E731

    progress = ops.div(ops.sub(t, c(warmup_steps)), c(max(1, total_steps - warmup_steps)))
    progress = ops.minimum(ops.maximum(progress, c(0.0)), c(1.0))
    cosine = ops.mul(ops.add(c(1.0), ops.cos(ops.mul(progress, c(math.pi)))), c(0.5 * (base_lr - min_lr)))
    cosine = ops.add(cosine, c(min_lr))
    if warmup_steps == 0:
        return _keep_shape(cosine, step)

    warm = ops.mul(ops.add(t, c(1.0)), c(base_lr / warmup_steps))
    # A blend instead of ops.where, which returns float32 for two 0-d numpy operands.
    in_warmup = ops.cast(ops.greater(c(warmup_steps), t), dtype)
    lr = ops.add(ops.mul(in_warmup, warm), ops.mul(ops.sub(c(1.0), in_warmup), cosine))
    return _keep_shape(lr, step)


# --------------------------------------------------------------------------------------------
# Adam family


def _adam_leaf(p, g, m, v, k: dict, decay: bool):
    """Apply one Adam(W) step to a leaf in torch.optim's operation order; ``k`` contains the step's scalars."""
    m = ops.add(ops.mul(m, k["beta1"]), ops.mul(g, k["one_minus_beta1"]))
    v = ops.add(ops.mul(v, k["beta2"]), ops.mul(ops.square(g), k["one_minus_beta2"]))
    denom = ops.add(ops.div(ops.sqrt(v), k["sqrt_bc2"]), k["eps"])
    if decay:
        p = ops.mul(p, k["decay_factor"])
    p = ops.sub(p, ops.mul(ops.div(m, denom), k["step_size"]))
    return p, m, v


def _adam_scalars(step, lr, dtype, betas, eps: float, weight_decay: float) -> dict:
    """Compute bias corrections and step sizes as 0-d values of ``dtype``; ``step`` counts from 1."""
    c = lambda x: _const(x, dtype)  # noqa: E731
    t = _scalar(step, dtype)  # (1,)
    lr = _scalar(lr, dtype)
    bc1 = ops.sub(c(1.0), ops.pow(c(betas[0]), t))
    bc2 = ops.sub(c(1.0), ops.pow(c(betas[1]), t))
    return {
        "beta1": c(betas[0]),
        "one_minus_beta1": c(1.0 - betas[0]),
        "beta2": c(betas[1]),
        "one_minus_beta2": c(1.0 - betas[1]),
        "eps": c(eps),
        "sqrt_bc2": ops.sqrt(bc2),
        "step_size": ops.div(lr, bc1),
        "decay_factor": ops.sub(c(1.0), ops.mul(lr, c(weight_decay))),
    }


def _increment(step):
    return _keep_shape(ops.add(_scalar(step, ops.dtype_of(step)), _const(1, ops.dtype_of(step))), step)


@dataclass
class AdamW:
    """AdamW with decoupled weight decay (Loshchilov & Hutter), matching ``torch.optim.AdamW``.

    ``decay_mask(path, array) -> bool`` picks the decayed parameters (default: ``default_decay_mask``).
    It receives traced values under ``mg.compile``, so it may read names, shapes and dtypes, not contents.
    State: ``{"step": int32 (), "m": tree, "v": tree}``, moments in each parameter's dtype.
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay_mask: DecayMask | None = None

    def __post_init__(self) -> None:
        _check_hyper("lr", self.lr, 0.0)
        _check_hyper("betas[0]", self.betas[0], 0.0, 1.0, high_open=True)
        _check_hyper("betas[1]", self.betas[1], 0.0, 1.0, high_open=True)
        _check_hyper("eps", self.eps, 0.0)
        _check_hyper("weight_decay", self.weight_decay, 0.0)

    def init(self, params) -> dict:
        _flatten_params(params)
        return {"step": np.zeros((), STEP_DTYPE), "m": _zeros_like(params), "v": _zeros_like(params)}

    def update(self, params, grads, state: dict, lr=None) -> tuple[Any, dict]:
        """Return (new params, new state) after one step; ``lr`` (float or 0-d array) overrides ``self.lr``."""
        leaves, treedef, paths = _flatten_params(params)
        g_leaves = _flatten_like(grads, treedef, "grads", params)
        m_leaves = _flatten_like(state["m"], treedef, "state['m']", params)
        v_leaves = _flatten_like(state["v"], treedef, "state['v']", params)
        step = _increment(state["step"])
        lr = self.lr if lr is None else lr
        mask = self.decay_mask or default_decay_mask

        scalars: dict = {}
        new_p, new_m, new_v = [], [], []
        for path, p, g, m, v in zip(paths, leaves, g_leaves, m_leaves, v_leaves):
            dtype = ops.dtype_of(p)
            if dtype not in scalars:
                scalars[dtype] = _adam_scalars(step, lr, dtype, self.betas, self.eps, self.weight_decay)
            decay = self.weight_decay > 0 and bool(mask(path, p))
            new = _adam_leaf(p, g, m, v, scalars[dtype], decay)
            new_p.append(_keep_shape(new[0], p))
            new_m.append(_keep_shape(new[1], p))
            new_v.append(_keep_shape(new[2], p))
        state = {"step": step, "m": tree_unflatten(treedef, new_m), "v": tree_unflatten(treedef, new_v)}
        return tree_unflatten(treedef, new_p), state


@dataclass
class Adam(AdamW):
    """Adam without weight decay; the same update and state as ``AdamW(weight_decay=0)``."""

    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.weight_decay != 0.0:
            raise ValueError(
                f"Adam takes no weight_decay (got {self.weight_decay!r}); use AdamW for decoupled decay"
            )
        super().__post_init__()


# --------------------------------------------------------------------------------------------
# SGD


@dataclass
class SGD:
    """SGD with optional (Nesterov) momentum and L2 weight decay, matching ``torch.optim.SGD`` (no dampening).

    State: ``{"step": int32 ()}`` plus ``"momentum": tree`` when ``momentum > 0``.
    """

    lr: float = 1e-2
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check_hyper("lr", self.lr, 0.0)
        _check_hyper("momentum", self.momentum, 0.0)
        _check_hyper("weight_decay", self.weight_decay, 0.0)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False")

    def init(self, params) -> dict:
        _flatten_params(params)
        state = {"step": np.zeros((), STEP_DTYPE)}
        if self.momentum > 0:
            state["momentum"] = _zeros_like(params)
        return state

    def update(self, params, grads, state: dict, lr=None) -> tuple[Any, dict]:
        """Return (new params, new state) after one step; ``lr`` (float or 0-d array) overrides ``self.lr``."""
        leaves, treedef, _ = _flatten_params(params)
        g_leaves = _flatten_like(grads, treedef, "grads", params)
        use_momentum = self.momentum > 0
        b_leaves = _flatten_like(state["momentum"], treedef, "state['momentum']", params) if use_momentum else leaves
        lr = self.lr if lr is None else lr

        new_p, new_b = [], []
        for p, g, buf in zip(leaves, g_leaves, b_leaves):
            dtype = ops.dtype_of(p)
            if self.weight_decay > 0:
                g = ops.add(g, ops.mul(p, _const(self.weight_decay, dtype)))
            if use_momentum:
                # A zero buffer makes the first step buf = g, as torch's lazily created buffer does.
                buf = ops.add(ops.mul(buf, _const(self.momentum, dtype)), g)
                g = ops.add(g, ops.mul(buf, _const(self.momentum, dtype))) if self.nesterov else buf
                new_b.append(_keep_shape(buf, p))
            new_p.append(_keep_shape(ops.sub(p, ops.mul(g, _scalar(lr, dtype))), p))

        state = {"step": _increment(state["step"])}
        if use_momentum:
            state["momentum"] = tree_unflatten(treedef, new_b)
        return tree_unflatten(treedef, new_p), state


# --------------------------------------------------------------------------------------------
# The reference system's optimiser

_GROUPS = ("adamw", "adam", "sgd", "frozen")


@dataclass
class ReferenceRegionalAdamW:
    """The reference system's RegionalAdamW rule, for comparing against its training runs.

    ``group(path, array)`` returns "adamw" (decoupled decay), "adam" (no decay), "sgd" (``w -= lr' g``)
    or "frozen" (never updated). The gradients are not rescaled. Instead, every group uses
    ``lr' = lr * min(1, grad_clip / n)``, where ``n`` is the L2 norm of the gradients that
    ``clip_mask(path, array)`` selects (all of them by default), with no epsilon. State is AdamW's.
    """

    group: Callable[[str, Any], str]
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_mask: DecayMask | None = None

    def __post_init__(self) -> None:
        AdamW(self.lr, self.betas, self.eps, self.weight_decay)  # validates the shared hyperparameters
        _check_hyper("grad_clip", self.grad_clip, 0.0)

    def init(self, params) -> dict:
        return AdamW().init(params)

    def update(self, params, grads, state: dict, lr=None) -> tuple[Any, dict]:
        """Return (new params, new state) after one step; ``lr`` (float or 0-d array) overrides ``self.lr``."""
        leaves, treedef, paths = _flatten_params(params)
        g_leaves = _flatten_like(grads, treedef, "grads", params)
        m_leaves = _flatten_like(state["m"], treedef, "state['m']", params)
        v_leaves = _flatten_like(state["v"], treedef, "state['v']", params)
        groups = [self.group(path, p) for path, p in zip(paths, leaves)]
        for path, name in zip(paths, groups):
            if name not in _GROUPS:
                raise ValueError(f"group({path!r}) returned {name!r}; expected one of {', '.join(_GROUPS)}")

        clip_mask = self.clip_mask or (lambda path, array: True)
        counted = [g for path, p, g in zip(paths, leaves, g_leaves) if clip_mask(path, p)]
        norm = global_norm(counted)
        norm_dtype = ops.dtype_of(norm)
        norm = _scalar(norm, norm_dtype)  # (1,)
        # The floor keeps a zero norm finite: grad_clip / 1e-30 still clamps to a factor of 1.
        factor = ops.div(_const(self.grad_clip, norm_dtype), ops.maximum(norm, _const(1e-30, norm_dtype)))
        factor = ops.minimum(factor, _const(1.0, norm_dtype))
        clipped_lr = ops.mul(_scalar(self.lr if lr is None else lr, norm_dtype), factor)

        step = _increment(state["step"])
        scalars: dict = {}
        new_p, new_m, new_v = [], [], []
        for name, p, g, m, v in zip(groups, leaves, g_leaves, m_leaves, v_leaves):
            dtype = ops.dtype_of(p)
            if dtype not in scalars:
                scalars[dtype] = _adam_scalars(step, clipped_lr, dtype, self.betas, self.eps, self.weight_decay)
            new = (p, m, v)
            if name in ("adamw", "adam"):
                new = _adam_leaf(p, g, m, v, scalars[dtype], decay=name == "adamw" and self.weight_decay > 0)
            elif name == "sgd":
                new = (ops.sub(p, ops.mul(g, ops.cast(clipped_lr, dtype))), m, v)
            new_p.append(_keep_shape(new[0], p))
            new_m.append(_keep_shape(new[1], p))
            new_v.append(_keep_shape(new[2], p))
        state = {"step": step, "m": tree_unflatten(treedef, new_m), "v": tree_unflatten(treedef, new_v)}
        return tree_unflatten(treedef, new_p), state
