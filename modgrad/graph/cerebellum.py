"""A frozen Qwen2 language model mounted as a brain's cerebellum, through a learned projection and blend.

The frozen model reads the token window once. Its hidden states, one per decoder layer,
(layers, B, L, H), are fixed inputs of the brain, and no gradient reaches the frozen weights.
At token t the brain mixes the layers and projects the mix to the cerebellum region's width D:

    h_t = sum_l softmax(layer_logits)_l * hidden[l, :, t]        (B, H)
    c_t = sigmoid(blend_logit) * proj_out(h_t)                   (B, D)

c_t is added to the cerebellum region's output at every outer tick of token t, where the other
regions and the global sync read it (``output_offsets`` of ``brain_step``). The region's own
recurrent state does not include it.

Trainable: proj_out, blend_logit and layer_logits. The initial values follow the reference
system: proj_out Xavier-uniform with a zero bias, layer_logits 0 (an even mix), blend_logit -2
(sigmoid(-2) = 0.119). The reference never updates layer_logits; here they get exact gradients
like the rest. Its proj_in (D -> H) served a per-token mode whose frozen forward returns zeros,
so it is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modgrad import ops
from modgrad.ctm.model import linear
from modgrad.graph.brain import brain_step, embed_tokens, init_brain_state
from modgrad.graph.config import RegionalConfig
from modgrad.transformer.config import Qwen2Config
from modgrad.transformer.qwen2 import hidden_states


@dataclass(frozen=True)
class CerebellumConfig:
    """Mount point and shape of a frozen model's hidden states in a brain.

    region: index of the brain region whose output receives the projection. hidden_size: width H
    of the frozen model's hidden states. n_layers: hidden-state layers mixed, one per decoder layer.
    blend_init: initial blend logit; the projection enters scaled by sigmoid(blend_logit).
    """

    region: int
    hidden_size: int
    n_layers: int
    blend_init: float = -2.0

    def __post_init__(self) -> None:
        if not isinstance(self.region, int) or self.region < 0:
            raise ValueError(f"CerebellumConfig.region must be a non-negative int, got {self.region!r}")
        for name in ("hidden_size", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CerebellumConfig.{name} must be a positive int, got {value!r}")

    @classmethod
    def for_qwen2(cls, brain: RegionalConfig, qwen: Qwen2Config, region: str = "cerebellum") -> "CerebellumConfig":
        """Mount a Qwen2 of config ``qwen`` on the first region of ``brain`` whose name contains ``region``."""
        try:
            index = brain.region_index(region)
        except KeyError:
            raise ValueError(
                f"brain {brain.name!r} has no region named like {region!r} to mount the frozen model on; "
                f"regions are {list(brain.region_names)}"
            ) from None
        return cls(index, qwen.hidden_size, qwen.num_hidden_layers)

    def region_dim(self, brain: RegionalConfig) -> int:
        """Output width D of the mounted region."""
        if not 0 <= self.region < brain.n_regions:
            raise ValueError(
                f"cerebellum region {self.region} does not exist; brain {brain.name!r} has regions 0..{brain.n_regions - 1}"
            )
        return brain.regions[self.region].d_model


def init_cerebellum(cfg: CerebellumConfig, brain: RegionalConfig, seed: int = 0) -> dict:
    """Return the trainable parameters as float32 numpy arrays.

    proj_out  Linear(hidden_size -> D of the region): w (H, D) Xavier-uniform, b (D,) zero
    layer_logits  (n_layers,) zero
    blend_logit   (1,) cfg.blend_init
    """
    d = cfg.region_dim(brain)
    bound = np.sqrt(6.0 / (cfg.hidden_size + d))
    w = np.random.default_rng(seed).uniform(-bound, bound, (cfg.hidden_size, d))
    return {
        "proj_out": {"w": w.astype(np.float32), "b": np.zeros(d, np.float32)},
        "layer_logits": np.zeros(cfg.n_layers, np.float32),
        "blend_logit": np.full(1, cfg.blend_init, np.float32),
    }


def check_cerebellum(params: dict, cfg: CerebellumConfig, brain: RegionalConfig) -> None:
    """Raise ValueError unless ``params`` fit ``cfg`` and the mounted region of ``brain``."""
    d = cfg.region_dim(brain)
    rows, cols = ops.shape_of(params["proj_out"]["w"])
    if rows != cfg.hidden_size:
        raise ValueError(
            f"the frozen model's hidden size {cfg.hidden_size} does not match the cerebellum projection's "
            f"input width {rows}; initialise the projection for this model with init_cerebellum"
        )
    if cols != d:
        raise ValueError(
            f"the cerebellum projection writes {cols} features, but region {cfg.region} "
            f"({brain.region_names[cfg.region]}) has width {d}; initialise the projection for this brain"
        )
    n_layers = ops.shape_of(params["layer_logits"])[0]
    if n_layers != cfg.n_layers:
        raise ValueError(f"the cerebellum mixes {n_layers} layers, but the frozen model has {cfg.n_layers}")


def encode_context(qwen_params: dict, ids, qwen: Qwen2Config):
    """Compute the frozen Qwen2's hidden states (layers, B, L, H) for token ids (B, L), with gradients stopped.

    For a Qwen2 object, ``model.hidden_states(ids)`` computes the same values on its own device.
    """
    positions = np.arange(ops.shape_of(ids)[1], dtype=np.int64)
    return ops.stop_gradient(hidden_states(qwen_params, ids, positions, qwen))


def cerebellum_offsets(params: dict, hidden):
    """Mix the layers and project: sigmoid(blend_logit) * proj_out(sum_l w_l hidden_l).

    hidden (layers, B, L, H) -> (B, L, D), where w = softmax(layer_logits).
    """
    n_layers, rows = ops.shape_of(params["layer_logits"])[0], ops.shape_of(params["proj_out"]["w"])[0]
    shape = ops.shape_of(hidden)
    if len(shape) != 4:
        raise ValueError(f"hidden states must be (layers, B, L, H), got shape {tuple(shape)}")
    if shape[-1] != rows:
        raise ValueError(
            f"the frozen model's hidden size {shape[-1]} does not match the cerebellum projection's "
            f"input width {rows}; build the projection with CerebellumConfig.for_qwen2 for this model"
        )
    if shape[0] != n_layers:
        raise ValueError(
            f"hidden states have {shape[0]} layers, but the cerebellum mixes {n_layers}; pass one per decoder layer"
        )

    hidden = ops.stop_gradient(hidden)  # the frozen model never receives a gradient
    mix = ops.softmax(params["layer_logits"], -1)  # (layers,)
    mixed = ops.sum(hidden * ops.reshape(mix, (n_layers, 1, 1, 1)), 0)  # (B, L, H)
    return ops.sigmoid(params["blend_logit"]) * linear(params["proj_out"], mixed)  # (B, L, D)


def cerebellum_forward_tokens(params: dict, buffers: dict, brain: RegionalConfig, cerebellum: dict,
                              cfg: CerebellumConfig, tokens, hidden, state: dict | None = None):
    """Run the brain over a token window with the frozen model's hidden states added at the cerebellum.

    tokens (B, L) int64; hidden (layers, B, L, H), position t aligned with token t; ``cerebellum`` are
    the parameters of ``init_cerebellum``. Like ``brain_forward_tokens``, the state is carried from
    token to token and gradients flow through the whole window. Returns (logits (B, L, K, out_dims), final state).
    """
    if brain.is_spatial:
        raise ValueError(f"brain {brain.name!r} takes token-set observations; mount the cerebellum on a token brain")
    check_cerebellum(cerebellum, cfg, brain)
    batch, length = ops.shape_of(tokens)
    hidden_batch, hidden_length = ops.shape_of(hidden)[1:3]
    if (hidden_batch, hidden_length) != (batch, length):
        raise ValueError(
            f"hidden states cover (B, L) = ({hidden_batch}, {hidden_length}), but the tokens are ({batch}, {length}); "
            "encode the same window with the frozen model"
        )
    if state is None:
        state = init_brain_state(params, brain, batch)
    obs = ops.transpose(embed_tokens(params, tokens), (1, 0, 2))  # (L, B, raw)
    offsets = ops.transpose(cerebellum_offsets(cerebellum, hidden), (1, 0, 2))  # (L, B, D)

    def body(carry, xs):
        obs_t, offset_t = xs
        logits, carry = brain_step(params, buffers, brain, obs_t, carry, output_offsets={cfg.region: offset_t})
        return carry, logits

    state, logits = ops.scan(body, state, xs=(obs, offsets))  # logits (L, B, K, out_dims)
    return ops.transpose(logits, (1, 0, 2, 3)), state


__all__ = [
    "CerebellumConfig",
    "cerebellum_forward_tokens",
    "cerebellum_offsets",
    "check_cerebellum",
    "encode_context",
    "init_cerebellum",
]
