"""The Continuous Thought Machine: config, weights, forward over ticks, losses."""

from modgrad.ctm.config import CtmConfig, ExitStrategy
from modgrad.ctm.weights import count_params, init_ctm

__all__ = ["CtmConfig", "ExitStrategy", "count_params", "init_ctm"]
