"""Qwen2 architecture hyperparameters, read from a Hugging Face ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Qwen2Config:
    """Shapes and constants of a Qwen2 / Qwen2.5 decoder; the defaults are Qwen2.5-0.5B's."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Qwen2Config.{f.name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} and rms_norm_eps={self.rms_norm_eps} must be positive")

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once (Qwen2.5-0.5B: 494,032,768)."""
        d, i = self.hidden_size, self.intermediate_size
        attention = d * (self.q_size + 2 * self.kv_size) + self.q_size + 2 * self.kv_size + self.q_size * d
        layer = attention + 3 * d * i + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * layer + d

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "Qwen2Config":
        """Build from the dict of a Hugging Face ``config.json``; raise ValueError on unsupported variants."""
        model_type = config.get("model_type")
        if model_type != "qwen2":
            raise ValueError(f"unsupported architecture: model_type={model_type!r}; only 'qwen2' (Qwen2, Qwen2.5) loads")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act={act!r}; Qwen2 uses 'silu'")
        if config.get("use_sliding_window", False) or "sliding_attention" in (config.get("layer_types") or []):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported; only full attention")

        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
                   if k not in config]
        if missing:
            raise ValueError(f"config.json lacks required field(s) {', '.join(missing)}")
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(_rope_theta(config)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        )


def _rope_theta(config: dict[str, Any]) -> float:
    """Read the rotary base from ``rope_theta`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported rotary scaling rope_type={rope_type!r}; only 'default' RoPE is implemented")
    theta = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
    return theta
