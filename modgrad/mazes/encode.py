"""Maze pixels, the fixed visual encoder that turns them into spatial tokens, and batch sampling.

Pipeline for a 21×21 maze (B mazes at once):

    pixels (B, 3, 21, 21)
    retina  conv 3→12,  k3 s2 p1, fixed centre-surround / colour-opponent bank → (B, 12, 11, 11)
    V1      conv 12→32, k3 s1 p1, random (+ Gabor blocks for the single-CTM preset) → (B, 32, 11, 11)
    V2      conv 32→64, k3 s1 p1, random → (B, 64, 11, 11)
    V4      conv 64→128, k3 s1 p1, random → (B, 128, 11, 11)
    tokens  (B, 121, 128), token index y·11 + x

Every conv is followed by leaky ReLU (slope 0.1) and has zero bias. No stage is trained.
Random weights default to the reference codec's own streams (an LCG Box-Muller normal seeded
with `in·out·k + 31337` per conv). Checked against a rustc build of that init, about 98.5 % of
the weights are bit-identical and the rest differ by 1 ulp, where the float32 ln/cos of the two
math libraries round differently.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from modgrad.mazes.generate import ROUTE_LEN, Maze, MazeRng, generate_mazes, route_targets

_MASK64 = (1 << 64) - 1
_LCG_MUL = 6364136223846793005
_LCG_INC = 1442695040888963407
LEAKY_SLOPE = 0.1
HELDOUT_SEED_OFFSET = 999  # the evaluation stream is MazeRng(seed + 999)
HELDOUT_COUNT = 200


# ----------------------------------------------------------------------------------------------
# pixels


def render_pixels(maze: Maze, sdf: bool = False) -> np.ndarray:
    """Render a maze as a (3, S, S) float32 RGB image in [0, 1], channel-major.

    Walls are black, open cells white, the start red (1, 0, 0) and the goal green (0, 1, 0).
    With `sdf=True` each open cell's grey level is `0.1 + 0.9·d/d_max`, where d is its BFS
    distance to the nearest wall and d_max the largest such distance in the grid.
    """
    open_cells = ~maze.walls
    luminance = open_cells.astype(np.float32)
    if sdf:
        distance = _wall_distance(maze.walls)
        d_max = max(int(distance.max()), 1)
        luminance = np.where(open_cells, 0.1 + 0.9 * (distance / d_max), 0.0).astype(np.float32)

    pixels = np.repeat(luminance[None], 3, axis=0)
    pixels[:, maze.start[0], maze.start[1]] = (1.0, 0.0, 0.0)
    pixels[:, maze.goal[0], maze.goal[1]] = (0.0, 1.0, 0.0)
    return pixels


def render_batch(mazes: list[Maze], sdf: bool = False) -> np.ndarray:
    """Stack rendered mazes into (B, 3, S, S) float32."""
    if not mazes:
        raise ValueError("render_batch needs at least one maze")
    return np.stack([render_pixels(m, sdf=sdf) for m in mazes])


def _wall_distance(walls: np.ndarray) -> np.ndarray:
    """Return the 4-neighbour BFS distance of every cell to the nearest wall (walls are 0)."""
    size_r, size_c = walls.shape
    distance = np.full(walls.shape, -1, dtype=np.int64)
    queue = deque()
    for r, c in zip(*np.nonzero(walls)):
        distance[r, c] = 0
        queue.append((r, c))
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < size_r and 0 <= nc < size_c and distance[nr, nc] < 0:
                distance[nr, nc] = distance[r, c] + 1
                queue.append((nr, nc))
    # Cells stay unreached only in a grid without any wall. They get 0 instead of -1.
    return np.maximum(distance, 0)


# ----------------------------------------------------------------------------------------------
# reference random streams


def _lcg64_states(seed: int, n: int) -> np.ndarray:
    """Return the first n LCG64 states after `seed` (the seed itself excluded), as uint64.

    States are built by doubling: once s_1..s_m are known, s_{m+i} = A·s_i + C, where
    (A, C) is the affine map s → a·s + c composed m times, all modulo 2^64.
    """
    states = np.empty(max(n, 1), dtype=np.uint64)
    states[0] = (seed * _LCG_MUL + _LCG_INC) & _MASK64
    mul, inc = _LCG_MUL, _LCG_INC  # the map applied m times, m = number of known states
    known = 1
    while known < n:
        take = min(known, n - known)
        states[known : known + take] = states[:take] * np.uint64(mul) + np.uint64(inc)
        mul, inc = (mul * mul) & _MASK64, (mul * inc + inc) & _MASK64
        known += take
    return states[:n]


def _log_f32(x: np.ndarray) -> np.ndarray:
    # numpy's float32 log/cos/exp are SIMD approximations up to a few ulp off. Evaluating in
    # float64 and rounding once is correctly rounded, which is within 1 ulp of the reference's libm.
    return np.log(x.astype(np.float64)).astype(np.float32)


def _cos_f32(x: np.ndarray) -> np.ndarray:
    return np.cos(np.asarray(x, dtype=np.float64)).astype(np.float32)


def _sin_f32(x: np.ndarray) -> np.ndarray:
    return np.sin(np.asarray(x, dtype=np.float64)).astype(np.float32)


def _exp_f32(x: np.ndarray) -> np.ndarray:
    return np.exp(np.asarray(x, dtype=np.float64)).astype(np.float32)


def lcg_normal(seed: int, n: int) -> np.ndarray:
    """Draw n float32 normals the way the reference codec initialises conv weights.

    Each normal uses two LCG64 steps: `u = (s >> 40) / 2^24`, then
    `z = sqrt(-2 ln max(u1, 1e-10)) · cos(2π u2)`, computed in float32.
    """
    states = _lcg64_states(seed, 2 * n)
    uniform = (states >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    u1 = np.maximum(uniform[0::2], np.float32(1e-10))
    u2 = uniform[1::2]
    radius = np.sqrt(np.float32(-2.0) * _log_f32(u1))
    return radius * _cos_f32(np.float32(2.0 * np.pi) * u2)


def xorshift_uniform(seed: int, n: int) -> np.ndarray:
    """Draw n float32 uniforms in [0, 1] from xorshift64 started at `seed + 0x9E3779B97F4A7C15`."""
    state = (seed + 0x9E3779B97F4A7C15) & _MASK64
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        state ^= (state << 13) & _MASK64
        state ^= state >> 7
        state ^= (state << 17) & _MASK64
        out[i] = np.float32(state / float(_MASK64))
    return out


# ----------------------------------------------------------------------------------------------
# fixed filter banks


def retina_filters() -> np.ndarray:
    """Return the fixed 12-channel ganglion-cell bank as (12, 3, 3, 3) float32 weights.

    Channels: 0 luminance ON, 1 luminance OFF, 2-4 R/G/B ON, 5 R+/G-, 6 G+/R-, 7 B+/Y-,
    8 Y+/B-, 9 wide-field ON (blur), 10 wide-field OFF, 11 luminance integrator.
    ON is the 3×3 centre-surround [-1 … 8 … -1] / 8 and OFF its negation.
    """
    on = np.full((3, 3), -1.0, dtype=np.float32)
    on[1, 1] = 8.0
    on /= 8.0
    off = -on
    blur = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32) / 16.0
    point = np.zeros((3, 3), dtype=np.float32)
    point[1, 1] = 1.0 / 3.0
    zero = np.zeros((3, 3), dtype=np.float32)

    bank = [  # per output channel: kernels on the R, G, B inputs
        (on, on, on),
        (off, off, off),
        (on, zero, zero),
        (zero, on, zero),
        (zero, zero, on),
        (on, off, zero),
        (off, on, zero),
        (0.5 * off, 0.5 * off, on),
        (0.5 * on, 0.5 * on, off),
        (blur, blur, blur),
        (-blur, -blur, -blur),
        (point, point, point),
    ]
    return np.array(bank, dtype=np.float32)


def stamp_gabor_blocks(weight: np.ndarray, seed: int = 0xC0FFEE, l2: float = 0.70710677) -> np.ndarray:
    """Return a copy of V1 weights (32, 12, 3, 3) with one Gabor block per output channel.

    Output channel oc gets orientation (oc mod 8)·π/8, phase 0 or π/2 by (oc div 8) mod 2,
    and replaces the random block on retina channel 0 (lum ON) or 1 (lum OFF) by
    (oc div 16) mod 2. Each Gabor (σ 0.8, λ 2.5) is made zero-mean, scaled to L2 norm `l2`,
    then perturbed by ±3 % of `l2` with xorshift64 noise. The other 11 blocks keep their values.
    """
    if weight.shape != (32, 12, 3, 3):
        raise ValueError(f"Gabor blocks need V1 weights of shape (32, 12, 3, 3), got {weight.shape}")
    weight = weight.copy()
    l2 = np.float32(l2)
    sigma, wavelength = np.float32(0.8), np.float32(2.5)
    noise_amplitude = np.float32(0.03) * l2
    noise = xorshift_uniform(seed, 32 * 9).reshape(32, 9)
    y, x = np.meshgrid(np.arange(-1, 2, dtype=np.float32), np.arange(-1, 2, dtype=np.float32), indexing="ij")

    for oc in range(32):
        theta = np.float32(oc % 8) * np.float32(np.pi) / np.float32(8.0)
        phase = np.float32(0.0) if (oc // 8) % 2 == 0 else np.float32(np.pi / 2.0)
        source = 0 if (oc // 16) % 2 == 0 else 1
        cos_t, sin_t = _cos_f32(theta), _sin_f32(theta)
        xr = x * cos_t + y * sin_t
        yr = -x * sin_t + y * cos_t
        envelope = _exp_f32(-(xr * xr + yr * yr) / (np.float32(2.0) * sigma * sigma))
        kernel = envelope * _cos_f32(np.float32(2.0 * np.pi) * xr / wavelength + phase)
        kernel -= _sequential_sum(kernel) / np.float32(9.0)
        norm = np.sqrt(_sequential_sum(kernel * kernel))
        kernel *= l2 / max(norm, np.float32(1e-6))
        kernel += ((noise[oc] - np.float32(0.5)) * np.float32(2.0) * noise_amplitude).reshape(3, 3)
        weight[oc, source] = kernel
    return weight


def _sequential_sum(values: np.ndarray) -> np.float32:
    """Sum float32 values left to right, the reference's order (numpy's pairwise sum can differ in the last bit)."""
    total = np.float32(0.0)
    for v in values.ravel():
        total = np.float32(total + v)
    return total


# ----------------------------------------------------------------------------------------------
# encoder


def conv2d(x: np.ndarray, weight: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Apply a zero-padded, bias-free 2-D convolution (cross-correlation) to a batch.

    x (B, C, H, W), weight (O, C, k, k) → (B, O, H', W') with H' = (H + 2p - k) // s + 1.
    """
    batch, channels, _, _ = x.shape
    out_channels, in_channels, k, _ = weight.shape
    if channels != in_channels:
        raise ValueError(f"conv2d input has {channels} channels but the weights expect {in_channels}")
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    _, _, h_out, w_out, _, _ = windows.shape  # (B, C, H', W', k, k)
    patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(batch * h_out * w_out, channels * k * k)
    out = patches @ weight.reshape(out_channels, -1).T  # (B·H'·W', O)
    return out.reshape(batch, h_out, w_out, out_channels).transpose(0, 3, 1, 2)


def leaky_relu(x: np.ndarray) -> np.ndarray:
    return np.where(x < 0, x * np.float32(LEAKY_SLOPE), x)


@dataclass(frozen=True)
class EncoderConfig:
    """Settings of the fixed visual encoder.

    `gabor_v1` selects the single-CTM preset (`preserve_spatial` in the reference); without it
    the encoder is the brain's preset (random V1). `weight_seed=None` reproduces the reference
    weights. An integer draws the random convs from `numpy.random.default_rng(weight_seed)`
    with the same N(0, 1)·sqrt(2 / fan_in) scale instead.
    """

    input_size: int = 21
    gabor_v1: bool = True
    gabor_seed: int = 0xC0FFEE
    gabor_l2: float = float(np.float32(1.0) / np.float32(np.sqrt(2.0)))  # 1/√2 rounded as float32 math does
    weight_seed: int | None = None


# (name, in, out, stride) of the four stages, all 3×3 with padding 1
STAGES = (("retina", 3, 12, 2), ("v1", 12, 32, 1), ("v2", 32, 64, 1), ("v4", 64, 128, 1))
KERNEL_SIZE = 3


class VisualEncoder:
    """Fixed retina + random V1/V2/V4 convs that map maze pixels to spatial tokens."""

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        if config.input_size < 3:
            raise ValueError(f"input_size must be at least 3 pixels, got {config.input_size}")
        self.config = config
        self.weights = self._init_weights(config)  # name -> (O, C, 3, 3) float32; all biases are 0
        side = (config.input_size + 2 - KERNEL_SIZE) // 2 + 1
        self.token_grid = (side, side)
        self.n_tokens = side * side
        self.token_dim = STAGES[-1][2]

    @classmethod
    def single_ctm(cls, input_size: int = 21) -> VisualEncoder:
        """Return the single-CTM encoder: V1 random with Gabor blocks."""
        return cls(EncoderConfig(input_size=input_size, gabor_v1=True))

    @classmethod
    def brain(cls, input_size: int = 21) -> VisualEncoder:
        """Return the 8-region brain's encoder: V1 fully random."""
        return cls(EncoderConfig(input_size=input_size, gabor_v1=False))

    @staticmethod
    def _init_weights(config: EncoderConfig) -> dict[str, np.ndarray]:
        rng = None if config.weight_seed is None else np.random.default_rng(config.weight_seed)
        weights = {}
        for name, c_in, c_out, _ in STAGES:
            if name == "retina":
                weights[name] = retina_filters()
                continue
            fan_in = c_in * KERNEL_SIZE * KERNEL_SIZE
            count = c_out * fan_in
            if rng is None:
                normal = lcg_normal(c_in * c_out * KERNEL_SIZE + 31337, count)
            else:
                normal = rng.standard_normal(count, dtype=np.float32)
            scale = np.sqrt(np.float32(2.0) / np.float32(fan_in))
            weights[name] = (normal * scale).reshape(c_out, c_in, KERNEL_SIZE, KERNEL_SIZE)
        if config.gabor_v1:
            weights["v1"] = stamp_gabor_blocks(weights["v1"], config.gabor_seed, config.gabor_l2)
        return weights

    def feature_maps(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Run the four stages on (B, 3, S, S) pixels and return each activated map (B, C, h, w)."""
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.config.input_size, self.config.input_size):
            expected = (3, self.config.input_size, self.config.input_size)
            raise ValueError(f"pixels must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {pixels.shape}")
        x = pixels.astype(np.float32, copy=False)
        maps = {}
        for name, _, _, stride in STAGES:
            x = leaky_relu(conv2d(x, self.weights[name], stride=stride, padding=1))
            maps[name] = x
        return maps

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Encode (B, 3, S, S) pixels into (B, n_tokens, 128) float32 tokens, index y·w + x."""
        v4 = self.feature_maps(pixels)["v4"]  # (B, 128, h, w)
        batch, channels, _, _ = v4.shape
        return np.ascontiguousarray(v4.reshape(batch, channels, -1).transpose(0, 2, 1))

    def encode_mazes(self, mazes: list[Maze], sdf: bool = False) -> np.ndarray:
        return self(render_batch(mazes, sdf=sdf))


# ----------------------------------------------------------------------------------------------
# batches


@dataclass(frozen=True)
class MazeBatch:
    """Encoded mazes with their move targets; B may be below the requested size (skipped mazes)."""

    tokens: np.ndarray  # (B, n_tokens, 128) float32
    targets: np.ndarray  # (B, route_len) int64, WAIT-padded
    path_lengths: np.ndarray  # (B,) int64, full BFS route lengths
    mazes: list[Maze]


def make_batch(mazes: list[Maze], encoder: VisualEncoder, route_len: int = ROUTE_LEN, sdf: bool = False) -> MazeBatch:
    return MazeBatch(
        tokens=encoder.encode_mazes(mazes, sdf=sdf),
        targets=np.stack([route_targets(m.route, route_len) for m in mazes]),
        path_lengths=np.array([m.path_length for m in mazes], dtype=np.int64),
        mazes=mazes,
    )


class MazeDataset:
    """Endless stream of training batches from `MazeRng(seed)` plus a held-out set.

    Each batch draws `batch_size` fresh mazes from the one training stream, drops any with a
    path shorter than 3 without replacement (never at size 21), and encodes them. The
    held-out set is 200 mazes from the separate stream `MazeRng(seed + 999)`. It is only a
    different stream: nothing removes mazes that also occur in training.
    """

    def __init__(self, size: int = 21, seed: int = 42, batch_size: int = 8, route_len: int = ROUTE_LEN,
                 encoder: VisualEncoder | None = None, sdf: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.size = size | 1
        self.seed = seed
        self.batch_size = batch_size
        self.route_len = route_len
        self.sdf = sdf
        self.encoder = encoder if encoder is not None else VisualEncoder.single_ctm(self.size)
        if self.encoder.config.input_size != self.size:
            raise ValueError(f"encoder input_size {self.encoder.config.input_size} does not match maze size {self.size}")
        self.rng = MazeRng(seed)

    def next_batch(self) -> MazeBatch:
        """Draw and encode the next `batch_size` training mazes (fewer if some are skipped)."""
        mazes = generate_mazes(self.batch_size, self.size, self.rng)
        # A batch can only come out empty on tiny grids. The reference then skips the update,
        # but a sampler has to return data, so it draws the next batch_size mazes instead.
        while not mazes:
            mazes = generate_mazes(self.batch_size, self.size, self.rng)
        return make_batch(mazes, self.encoder, self.route_len, self.sdf)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (tokens (B, n_tokens, 128), targets (B, route_len)) batches forever."""
        while True:
            batch = self.next_batch()
            yield batch.tokens, batch.targets

    def heldout(self, count: int = HELDOUT_COUNT) -> MazeBatch:
        """Return the fixed evaluation set: `count` mazes from `MazeRng(seed + 999)`, short ones dropped."""
        mazes = generate_mazes(count, self.size, MazeRng(self.seed + HELDOUT_SEED_OFFSET))
        return make_batch(mazes, self.encoder, self.route_len, self.sdf)
