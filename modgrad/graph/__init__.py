"""Brains: CTM regions joined by connection synapses or a router, read out by a global synchronisation."""

from modgrad.graph.brain import brain_forward_tokens, brain_step, embed_tokens, init_brain_state
from modgrad.graph.cerebellum import (
    CerebellumConfig,
    cerebellum_forward_tokens,
    cerebellum_offsets,
    encode_context,
    init_cerebellum,
)
from modgrad.graph.computer import NeuralComputer
from modgrad.graph.config import (
    PRESETS,
    Connection,
    RegionalConfig,
    RouterConfig,
    eight_region,
    eight_region_billion,
    eight_region_large,
    eight_region_medium,
    eight_region_small,
    four_region,
    preset,
)
from modgrad.graph.session import RegionalAdamW, RegionalGradients, RegionalWeights, regional_train_token
from modgrad.graph.weights import (
    ParamSpec,
    buffer_shapes,
    byte_features,
    count_brain_params,
    init_brain,
    param_shapes,
)

__all__ = [
    "PRESETS",
    "Connection",
    "NeuralComputer",
    "ParamSpec",
    "RegionalAdamW",
    "RegionalConfig",
    "RegionalGradients",
    "RegionalWeights",
    "RouterConfig",
    "brain_forward_tokens",
    "buffer_shapes",
    "brain_step",
    "byte_features",
    "count_brain_params",
    "eight_region",
    "eight_region_billion",
    "eight_region_large",
    "eight_region_medium",
    "eight_region_small",
    "embed_tokens",
    "four_region",
    "init_brain",
    "init_brain_state",
    "param_shapes",
    "preset",
    "regional_train_token",
    "CerebellumConfig",
    "cerebellum_forward_tokens",
    "cerebellum_offsets",
    "encode_context",
    "init_cerebellum",
]
