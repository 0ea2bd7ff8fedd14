"""RegionalConfig: a brain of CTM regions joined by connection synapses or a learned router.

Presets follow the reference system's region tables. Region order is always input, attention,
output, motor (+ cerebellum, basal_ganglia, insula, hippocampus for the eight-region brains).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from modgrad.ctm.config import CtmConfig, ExitStrategy

REGION_NAMES = ("input", "attention", "output", "motor", "cerebellum", "basal_ganglia", "insula", "hippocampus")
INPUT, ATTENTION, OUTPUT, MOTOR, CEREBELLUM, BASAL_GANGLIA, INSULA, HIPPOCAMPUS = range(8)

# Per-region exit-gate beta; every region gate and the outer gate use threshold 0.99.
EXIT_BETA = {
    "input": 0.05,
    "attention": 0.10,
    "output": 0.10,
    "motor": 0.05,
    "cerebellum": 0.05,
    "basal_ganglia": 0.10,
    "insula": 0.05,
    "hippocampus": 0.15,
}
N_EXTRA_HEADS = 7


@dataclass(frozen=True)
class Connection:
    """A connection synapse: Linear(concat(outputs of ``sources``) (+ an observation slice) -> Di of ``target``).

    sources: region indices whose outputs are concatenated in this order. target: the receiving
    region. receives_observation: append slice ``observation_scale`` of the observation after the
    sources. Several connections into one region are summed.
    """

    sources: tuple[int, ...]
    target: int
    receives_observation: bool = False
    observation_scale: int = 0

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(int(s) for s in self.sources))


@dataclass(frozen=True)
class RouterConfig:
    """A learned router that replaces the fixed connections (mixture-of-sources routing).

    Each destination region reads the top ``k`` source regions, weighted by a softmax over sources
    of ``route_proj([global sync; tick embedding])``, through to_route (D_i -> d_route) and
    from_route (d_route -> Di_j). ``epsilon`` is the reference's probability of a random source
    set during training; this implementation always selects the top k.
    observe_input: add ``obs_proj(observation)`` to the input region's routed input. The reference
    router path never reads the observation, so its brains cannot see their tokens; set False to
    reproduce that.
    """

    d_route: int = 32
    tick_embed_dim: int = 16
    k: int = 3
    epsilon: float = 0.05
    observe_input: bool = True


@dataclass(frozen=True)
class RegionalConfig:
    """A brain: CTM regions, their connections (or a router), a global sync readout and an output head.

    outer_ticks: outer loop length K; one token runs K outer ticks, each running every region for
    its own ``ticks``. n_global_sync: neuron pairs of the global sync over concat(region outputs).
    out_dims: prediction width and embedding vocabulary. raw_obs_dim: observation width, the sum of
    obs_scale_dims (per-scale widths of a concatenated multi-scale observation).
    exit_strategy: the outer exit gate (an ``outer_exit_gate`` Linear exists iff it is adaptive).
    extra_heads: create the reference's 7 extra output heads (counted in its parameter totals).

    Some parameters exist only to match the reference's layout and counts. Nothing in this
    forward pass reads them, so they get zero gradient:

    - the 7 ``extra_heads``. The reference evaluates them on the raw embedding for a logged loss.
    - the ``outer_exit_gate`` and every region's ``output_proj`` and ``exit_gate``, because a
      brain reads region activations, not region predictions, and always runs all ticks.
    - the connection synapses when a router is set, because the router replaces them.
    - ``obs_proj`` when every region has an incoming connection, or with a router whose
      ``observe_input`` is False.

    Each region attends over a single observation token, so its attention output does not depend
    on the query: ``q_proj``, the action synchronisation and both sync decays of every region get
    zero gradient too (spatial regions excepted, see below). The reference's optimiser never
    updates the router and the outer gate, which here are trained like every other parameter.

    Spatial input: with ``spatial_tokens = n > 0`` the observation is a set of n tokens
    (B, n, raw_obs_dim), such as the cells of an image. Each region listed in ``spatial_regions``
    attends over all n tokens (its ``kv_proj`` maps raw_obs_dim -> Di), with a fixed 2-D
    sinusoidal position code added when ``spatial_position_code`` is set. When connections (or
    the router) feed a spatial region, their summed input joins the tokens as one more key/value
    token, so loops through the region stay closed. The reference's spatial regions drop that
    input instead. Every flat consumer (connections that receive the observation, ``obs_proj``)
    reads token 0.
    """

    regions: tuple[CtmConfig, ...]
    region_names: tuple[str, ...]
    connections: tuple[Connection, ...]
    outer_ticks: int
    n_global_sync: int
    out_dims: int
    raw_obs_dim: int
    obs_scale_dims: tuple[int, ...] = ()
    exit_strategy: ExitStrategy = ExitStrategy.adaptive_gate(0.1, 0.99)
    router: RouterConfig | None = None
    extra_heads: bool = True
    spatial_tokens: int = 0
    spatial_regions: tuple[int, ...] = ()
    spatial_position_code: bool = True
    name: str = "brain"

    def __post_init__(self):
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "region_names", tuple(self.region_names))
        object.__setattr__(self, "connections", tuple(self.connections))
        object.__setattr__(self, "spatial_regions", tuple(int(r) for r in self.spatial_regions))
        scales = tuple(self.obs_scale_dims) or (self.raw_obs_dim,)
        object.__setattr__(self, "obs_scale_dims", scales)
        self._validate()

    def _validate(self) -> None:
        n = len(self.regions)
        if n < 1:
            raise ValueError("RegionalConfig needs at least one region")
        if len(self.region_names) != n:
            raise ValueError(f"got {len(self.region_names)} region names for {n} regions")
        for field_name in ("outer_ticks", "n_global_sync", "out_dims", "raw_obs_dim"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"RegionalConfig.{field_name} must be >= 1, got {getattr(self, field_name)}")
        if sum(self.obs_scale_dims) != self.raw_obs_dim:
            raise ValueError(
                f"obs_scale_dims {list(self.obs_scale_dims)} sum to {sum(self.obs_scale_dims)}, "
                f"but raw_obs_dim is {self.raw_obs_dim}"
            )
        for i, conn in enumerate(self.connections):
            bad = [r for r in (*conn.sources, conn.target) if not 0 <= r < n]
            if bad:
                raise ValueError(f"connection {i} names region {bad[0]}, but the brain has regions 0..{n - 1}")
            if not conn.sources and not conn.receives_observation:
                raise ValueError(f"connection {i} has no sources and does not receive the observation")
            if conn.receives_observation and not 0 <= conn.observation_scale < len(self.obs_scale_dims):
                raise ValueError(
                    f"connection {i} reads observation scale {conn.observation_scale}, "
                    f"but obs_scale_dims has {len(self.obs_scale_dims)} scales"
                )
        self._validate_spatial()
        if self.router is None:
            di0 = self.regions[0].d_input
            for r in self.unconnected_regions:
                if self.regions[r].d_input != di0:
                    raise ValueError(
                        f"region {r} ({self.region_names[r]}) has no incoming connection, so it reads "
                        f"obs_proj (width {di0}), but its d_input is {self.regions[r].d_input}; "
                        "add a connection into it or give it the input region's d_input"
                    )
        elif self.router.k < 1:
            raise ValueError(f"RouterConfig.k must be >= 1, got {self.router.k}")

    def _validate_spatial(self) -> None:
        if self.spatial_tokens < 0:
            raise ValueError(f"RegionalConfig.spatial_tokens must be >= 0, got {self.spatial_tokens}")
        if bool(self.spatial_tokens) != bool(self.spatial_regions):
            raise ValueError(
                f"spatial_tokens={self.spatial_tokens} and spatial_regions={list(self.spatial_regions)} disagree: "
                "set both (a token count and the regions that attend over the tokens) or neither"
            )
        for r in self.spatial_regions:
            if not 0 <= r < len(self.regions):
                raise ValueError(f"spatial region {r} does not exist; the brain has regions 0..{len(self.regions) - 1}")
        if len(set(self.spatial_regions)) != len(self.spatial_regions):
            raise ValueError(f"spatial_regions lists a region twice: {list(self.spatial_regions)}")
        if self.spatial_position_code and self.spatial_tokens and self.raw_obs_dim % 2:
            raise ValueError(
                f"the 2-D position code splits raw_obs_dim={self.raw_obs_dim} into row and column halves, "
                "so it must be even; use an even token width or spatial_position_code=False"
            )

    # ----------------------------------------------------------------------------------------

    @property
    def n_regions(self) -> int:
        return len(self.regions)

    @property
    def total_d(self) -> int:
        """Width of concat(region outputs), the vector the global sync pairs index."""
        return sum(r.d_model for r in self.regions)

    @property
    def unconnected_regions(self) -> list[int]:
        """Flat regions without an incoming connection; they read ``obs_proj(observation)``."""
        targets = {c.target for c in self.connections}
        return [r for r in range(self.n_regions) if r not in targets and r not in self.spatial_regions]

    def obs_slice(self, scale: int) -> tuple[int, int]:
        """(start, length) of one scale inside the concatenated observation."""
        start = sum(self.obs_scale_dims[:scale])
        return start, self.obs_scale_dims[scale]

    @property
    def is_spatial(self) -> bool:
        """True when the observation is a token set (B, spatial_tokens, raw_obs_dim)."""
        return self.spatial_tokens > 0

    def region_raw_dim(self, r: int) -> int:
        """Input width of region r's kv_proj: raw_obs_dim for a spatial region, else its d_input."""
        return self.raw_obs_dim if r in self.spatial_regions else self.regions[r].d_input

    def connection_in_dim(self, conn: Connection) -> int:
        width = sum(self.regions[s].d_model for s in conn.sources)
        if conn.receives_observation:
            width += self.obs_scale_dims[conn.observation_scale]
        return width

    def region_index(self, name: str) -> int:
        """Index of the first region whose name contains ``name``."""
        for i, region_name in enumerate(self.region_names):
            if name in region_name:
                return i
        raise KeyError(f"no region name contains {name!r}; regions are {list(self.region_names)}")

    def replace(self, **changes) -> "RegionalConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict; ``RegionalConfig.from_dict`` rebuilds the config from it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RegionalConfig":
        data = dict(data)
        regions = []
        for r in data["regions"]:
            r = dict(r)
            r["exit_strategy"] = ExitStrategy(**r["exit_strategy"])
            regions.append(CtmConfig(**r))
        data["regions"] = regions
        data["connections"] = [Connection(**c) for c in data["connections"]]
        data["exit_strategy"] = ExitStrategy(**data["exit_strategy"])
        data["router"] = None if data["router"] is None else RouterConfig(**data["router"])
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Presets


def _region(name: str, d_model: int, d_input: int, memory_length: int, deep: bool, ticks: int) -> CtmConfig:
    gate = ExitStrategy.adaptive_gate(EXIT_BETA[name], 0.99)
    return CtmConfig.region(name, d_model, d_input, memory_length, deep, ticks, gate)


def _std8(attention_sources: tuple[int, ...] = (INPUT,)) -> list[Connection]:
    """Return the standard eight-region wiring: a closed cortical loop with motor feedback into input."""
    return [
        Connection((MOTOR,), INPUT, receives_observation=True),
        Connection(attention_sources, ATTENTION),
        Connection((ATTENTION,), OUTPUT),
        Connection((OUTPUT,), MOTOR),
        Connection((MOTOR,), CEREBELLUM, receives_observation=True),
        Connection((OUTPUT,), BASAL_GANGLIA),
        Connection((HIPPOCAMPUS,), INSULA),
        Connection((INPUT, ATTENTION, OUTPUT, MOTOR), HIPPOCAMPUS),
    ]


def _brain(
    name: str,
    sizes: list[tuple[int, int, int, bool]],
    connections: list[Connection],
    obs_dim: int,
    out_dims: int,
    ticks: int,
    cap: int,
    router: bool,
) -> RegionalConfig:
    names = REGION_NAMES[: len(sizes)]
    regions = [_region(n, d, di, m, deep, ticks) for n, (d, di, m, deep) in zip(names, sizes)]
    return RegionalConfig(
        regions=regions,
        region_names=names,
        connections=connections,
        outer_ticks=ticks,
        n_global_sync=min(sum(r.d_model for r in regions), cap),
        out_dims=out_dims,
        raw_obs_dim=obs_dim,
        router=RouterConfig() if router else None,
        name=name,
    )


def four_region(obs_dim: int, out_dims: int, ticks: int) -> RegionalConfig:
    """Four 64-neuron cortical regions in a loop; the motor output re-enters input with the observation."""
    sizes = [(64, obs_dim, 4, False), (64, obs_dim, 8, True), (64, obs_dim, 16, True), (64, obs_dim, 4, False)]
    connections = [
        Connection((MOTOR,), INPUT, receives_observation=True),
        Connection((INPUT,), ATTENTION),
        Connection((ATTENTION,), OUTPUT),
        Connection((OUTPUT,), MOTOR),
    ]
    return _brain("four_region", sizes, connections, obs_dim, out_dims, ticks, cap=256, router=False)


def eight_region_small(obs_dim: int, out_dims: int, ticks: int) -> RegionalConfig:
    """Eight small regions (D 32 cortex, 8 subcortex); region widths do not depend on obs_dim."""
    cortex = [(32, 16, 8, False), (32, 16, 8, True), (32, 16, 8, True), (32, 16, 8, False)]
    subcortex = [(8, 8, 4, False), (8, 8, 4, False), (8, 8, 4, False), (8, 8, 8, True)]
    connections = _std8() + [Connection((BASAL_GANGLIA,), HIPPOCAMPUS), Connection((HIPPOCAMPUS,), BASAL_GANGLIA)]
    return _brain("eight_region_small", cortex + subcortex, connections, obs_dim, out_dims, ticks, cap=256, router=False)


def _routed_eight(name, obs_dim, out_dims, ticks, cortex: int, sub: int, cap: int, attention_sources=(INPUT,)):
    """Eight deep regions: cortex D=cortex (M=cortex/8), subcortex D=sub (M=sub/2), hippocampus M=sub."""
    sizes = [(cortex, obs_dim, cortex // 8, True)] * 4
    sizes += [(sub, obs_dim, sub // 2, True)] * 3 + [(sub, obs_dim, sub, True)]
    return _brain(name, sizes, _std8(attention_sources), obs_dim, out_dims, ticks, cap=cap, router=True)


def eight_region(obs_dim: int, out_dims: int, ticks: int) -> RegionalConfig:
    """eight_region_large, except attention reads input and hippocampus."""
    return _routed_eight("eight_region", obs_dim, out_dims, ticks, 512, 64, 1024, (INPUT, HIPPOCAMPUS))


def eight_region_medium(obs_dim: int, out_dims: int, ticks: int) -> RegionalConfig:
    return _routed_eight("eight_region_medium", obs_dim, out_dims, ticks, 256, 32, 512)


def eight_region_large(obs_dim: int, out_dims: int, ticks: int) -> RegionalConfig:
    return _routed_eight("eight_region_large", obs_dim, out_dims, ticks, 512, 64, 1024)


def eight_region_billion(obs_dim: int, out_dims: int, ticks: int) -> RegionalConfig:
    return _routed_eight("eight_region_billion", obs_dim, out_dims, ticks, 1024, 128, 2048)


PRESETS = {
    "four_region": four_region,
    "eight_region_small": eight_region_small,
    "eight_region": eight_region,
    "eight_region_medium": eight_region_medium,
    "eight_region_large": eight_region_large,
    "eight_region_billion": eight_region_billion,
}


# The presets are also reachable as RegionalConfig.eight_region_small(...) and so on.
for _name, _build in PRESETS.items():
    setattr(RegionalConfig, _name, staticmethod(_build))


def preset(name: str, obs_dim: int, out_dims: int, ticks: int) -> RegionalConfig:
    """Build a preset by name."""
    if name not in PRESETS:
        raise ValueError(f"unknown brain preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name](obs_dim, out_dims, ticks)


__all__ = [
    "Connection",
    "PRESETS",
    "REGION_NAMES",
    "RegionalConfig",
    "RouterConfig",
    "eight_region",
    "eight_region_billion",
    "eight_region_large",
    "eight_region_medium",
    "eight_region_small",
    "four_region",
    "preset",
]
