"""CtmConfig: the shape of one Continuous Thought Machine, and the region rule brains use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ExitStrategy:
    """When inference may stop ticking early.

    kind "none": always run every tick. "certainty": stop after a tick whose certainty exceeds
    ``threshold``. "adaptive_gate": a learned gate gives a halting probability per tick; stop when
    the cumulative probability exceeds ``threshold``; ``beta`` weighs the gate loss's entropy term.
    """

    kind: str = "none"
    threshold: float = 0.99
    beta: float = 0.1

    def __post_init__(self):
        if self.kind not in ("none", "certainty", "adaptive_gate"):
            raise ValueError(f"unknown exit strategy {self.kind!r}; use 'none', 'certainty' or 'adaptive_gate'")

    @classmethod
    def none(cls) -> "ExitStrategy":
        return cls("none")

    @classmethod
    def adaptive_gate(cls, beta: float, threshold: float = 0.99) -> "ExitStrategy":
        return cls("adaptive_gate", threshold, beta)

    @classmethod
    def certainty(cls, threshold: float) -> "ExitStrategy":
        return cls("certainty", threshold)


@dataclass(frozen=True)
class CtmConfig:
    """Sizes of a CTM. Defaults follow the reference system's CtmConfig::default.

    ticks: internal ticks T per call. d_model: neurons D. d_input: attention width Di.
    heads: attention heads (Di // heads per head). n_synch_out / n_synch_action: neuron pairs
    read by the output and the attention query. synapse_depth: 1 = one Linear-LN-SiLU block,
    >1 = U-Net with that many widths. memory_length: trace window M. deep_nlms: two-stage NLM
    with memory_hidden_dims hidden units per neuron. out_dims: prediction width.
    n_random_pairing_self: the first k pairs are forced to (i, i). min_width: U-Net bottleneck.
    """

    ticks: int = 8
    d_model: int = 512
    d_input: int = 128
    heads: int = 4
    n_synch_out: int = 512
    n_synch_action: int = 512
    synapse_depth: int = 4
    memory_length: int = 25
    deep_nlms: bool = True
    memory_hidden_dims: int = 4
    out_dims: int = 10
    n_random_pairing_self: int = 0
    min_width: int = 16
    exit_strategy: ExitStrategy = ExitStrategy()
    name: str = "ctm"

    def __post_init__(self):
        positive = ("ticks", "d_model", "d_input", "heads", "synapse_depth", "memory_length", "out_dims")
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"CtmConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.n_synch_out < 1 or self.n_synch_action < 0:
            raise ValueError(
                f"need n_synch_out >= 1 and n_synch_action >= 0, got {self.n_synch_out}, {self.n_synch_action}"
            )
        if self.d_input % self.heads:
            raise ValueError(f"d_input={self.d_input} is not divisible by heads={self.heads}")
        if self.deep_nlms and self.memory_hidden_dims < 1:
            raise ValueError("deep_nlms=True needs memory_hidden_dims >= 1")
        if self.n_random_pairing_self > min(self.n_synch_out, max(self.n_synch_action, self.n_synch_out)):
            raise ValueError(f"n_random_pairing_self={self.n_random_pairing_self} exceeds the number of pairs")

    @property
    def head_dim(self) -> int:
        return self.d_input // self.heads

    @property
    def synapse_widths(self) -> list[int]:
        """U-Net widths from d_model down to min_width, rounded half away from zero."""
        if self.synapse_depth <= 1:
            return [self.d_model]
        widths = []
        for i in range(self.synapse_depth):
            w = self.d_model + i / (self.synapse_depth - 1) * (self.min_width - self.d_model)
            widths.append(max(1, int(w + 0.5) if w >= 0 else -int(-w + 0.5)))
        return widths

    @property
    def has_exit_gate(self) -> bool:
        return self.exit_strategy.kind == "adaptive_gate"

    def replace(self, **changes) -> "CtmConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def region(
        cls,
        name: str,
        d_model: int,
        d_input: int,
        memory_length: int,
        deep: bool,
        ticks: int,
        exit_strategy: ExitStrategy,
    ) -> "CtmConfig":
        """Build a region config by the rule every brain preset uses: sizes derived from (D, Di, M, deep)."""
        heads = min(max(d_input // 8, 1), 8) if d_input >= 8 else 1
        return cls(
            ticks=ticks,
            d_model=d_model,
            d_input=d_input,
            heads=heads,
            n_synch_out=d_model,
            n_synch_action=min(d_model, d_input),
            synapse_depth=3 if d_model >= 32 else 1,
            memory_length=memory_length,
            deep_nlms=deep,
            memory_hidden_dims=max(memory_length // 2, 2) if deep else 0,
            out_dims=d_model,
            n_random_pairing_self=0,
            min_width=max(d_model // 4, 4),
            exit_strategy=exit_strategy,
            name=name,
        )
