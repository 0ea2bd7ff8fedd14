"""Transformer language models on the modgrad engine: Qwen2 / Qwen2.5 loading, forward and decoding."""

from modgrad.transformer.config import Qwen2Config
from modgrad.transformer.qwen2 import KVCache, Qwen2, SamplingConfig, hidden_states, init_params, prefill_forward

__all__ = ["KVCache", "Qwen2", "Qwen2Config", "SamplingConfig", "hidden_states", "init_params", "prefill_forward"]
