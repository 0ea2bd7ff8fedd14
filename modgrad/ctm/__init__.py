"""The Continuous Thought Machine: config, weights, forward over ticks, losses."""

from modgrad.ctm.config import CtmConfig, ExitStrategy
from modgrad.ctm.infer import CtmWeights, ExitResult, ctm_infer
from modgrad.ctm.weights import count_params, init_ctm

__all__ = ["CtmConfig", "CtmWeights", "ExitResult", "ExitStrategy", "count_params", "ctm_infer", "init_ctm"]
