"""Qwen2 / Qwen2.5 causal language model: forward, key/value cache and sampling.

The math is written once with modgrad ops. ``device="numpy"`` calls it eagerly; ``device="cpu"``
compiles two programs with symbolic batch, sequence and cache lengths, so one compilation serves
every prompt and every decode step:

* prefill(params, ids (B, T), positions (T,), logit_rows (N,)) -> logits (B, N, V) and k, v rows
  (layers, T, B, n_kv, hd); ``logit_rows`` picks the positions whose logits are computed (all of
  them for ``model(ids)``, only the last one when generating).
* decode(params, ids (B, 1), position (1,), past k, v (layers, L, B, n_kv, hd)) -> logits (B, V)
  and the new token's k, v rows (layers, 1, B, n_kv, hd).

The layers run as a scan over weights stacked on a leading layer axis, so compile time does not
grow with depth. Prefill runs the embedding and the output head around the scan with numpy. The
decode step compiles them too, and its products of B rows use ``ops.matvec`` (the Mojo small-batch
kernel). Weights are float32, and bf16 and f16 checkpoints are widened on load.
TODO: bf16 compute (half the weight bytes per decoded token).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from modgrad import ops
from modgrad.transformer.config import Qwen2Config
from modgrad.transformer.layers import decoder_layer, decoder_layer_cached, rms_norm, rotary_tables

log = logging.getLogger(__name__)

DEVICES = ("cpu", "numpy")


# --------------------------------------------------------------------------------------------
# Model math


def embed(params: dict, ids):
    """Token embeddings (B, T, D); a tied model reads the columns of its (D, V) output matrix."""
    if "embed" in params:
        return ops.gather(params["embed"], ids, axis=0)  # (B, T, D)
    return ops.transpose(ops.gather(params["lm_head"], ids, axis=1), (1, 2, 0))  # (D, B, T) -> (B, T, D)


def prefill_forward(params: dict, ids, positions, logit_rows, cfg: Qwen2Config):
    """Run T tokens from an empty cache; return logits (B, N, V) at ``logit_rows`` and k, v (layers, T, B, n_kv, hd)."""
    h = embed(params, ids)  # (B, T, D)
    cos, sin = rotary_tables(positions, cfg)  # (T, hd)

    def layer_step(h, layer):
        h, k, v = decoder_layer(layer, h, cos, sin, positions, cfg)
        return h, (k, v)

    h, (keys, values) = ops.scan(layer_step, h, params["layers"])
    h = ops.gather(h, logit_rows, axis=1)  # (B, N, D)
    logits = rms_norm(h, params["norm"], cfg.rms_norm_eps) @ params["lm_head"]  # (B, N, V)
    return logits, keys, values


def hidden_states(params: dict, ids, positions, cfg: Qwen2Config):
    """Compute the residual stream after every decoder layer, (layers, B, T, D).

    The last layer's output also passes the final RMSNorm. These are the ``hidden_states[1:]`` of
    transformers' Qwen2Model with ``output_hidden_states=True`` (checked with transformers 5.25).
    """
    h = embed(params, ids)  # (B, T, D)
    cos, sin = rotary_tables(positions, cfg)  # (T, hd)

    def layer_step(h, layer):
        h, _, _ = decoder_layer(layer, h, cos, sin, positions, cfg)
        return h, h

    _, states = ops.scan(layer_step, h, params["layers"])  # (layers, B, T, D)
    last = rms_norm(states[-1], params["norm"], cfg.rms_norm_eps)  # (B, T, D)
    return ops.concat([states[:-1], ops.expand_dims(last, 0)], axis=0)


def decode_forward(params: dict, ids, position, past_keys, past_values, cfg: Qwen2Config):
    """Run one new token per row after L cached ones; return logits (B, V) and its k, v (layers, 1, B, n_kv, hd).

    past_keys and past_values are (layers, L, B, n_kv, hd).
    """
    h = embed(params, ids)  # (B, 1, D)
    cos, sin = rotary_tables(position, cfg)  # (1, hd)

    def layer_step(h, xs):
        layer, past_k, past_v = xs
        h, k, v = decoder_layer_cached(layer, h, cos, sin, past_k, past_v, cfg)
        return h, (k, v)

    h, (keys, values) = ops.scan(layer_step, h, (params["layers"], past_keys, past_values))
    logits = ops.matvec(rms_norm(h, params["norm"], cfg.rms_norm_eps), params["lm_head"])  # (B, 1, V)
    return ops.squeeze(logits, 1), keys, values


def init_params(cfg: Qwen2Config, seed: int = 0, std: float = 0.02) -> dict:
    """Draw random float32 weights, in the tree layout ``load_qwen2`` returns, for training from scratch.

    Matrices and embeddings are N(0, std^2), except the two projections that write into the residual
    stream (o_w, down_w), which use std / sqrt(2 * layers) as GPT-2 does. Biases are 0 and norm scales 1.
    """
    rng = np.random.default_rng(seed)
    n, d, i, qkv = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size
    residual_std = std / np.sqrt(2.0 * n)

    def normal(shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    params = {
        "layers": {
            "ln1": np.ones((n, d), np.float32),
            "qkv_w": normal((n, d, qkv), std),
            "qkv_b": np.zeros((n, qkv), np.float32),
            "o_w": normal((n, cfg.q_size, d), residual_std),
            "ln2": np.ones((n, d), np.float32),
            "gate_up_w": normal((n, d, 2 * i), std),
            "down_w": normal((n, i, d), residual_std),
        },
        "norm": np.ones(d, np.float32),
        "lm_head": normal((d, cfg.vocab_size), std),  # (D, V)
    }
    if not cfg.tie_word_embeddings:
        params["embed"] = normal((cfg.vocab_size, d), std)  # (V, D)
    return params


# --------------------------------------------------------------------------------------------
# Key/value cache


class KVCache:
    """Key and value rows of every layer on the host, each buffer (layers, capacity, B, n_kv, hd), filled to ``length``.

    Rows are stored sequence-first, so each layer's first ``length`` rows are one contiguous block
    that the compiled decode step reads without a copy. Appending writes the new rows in place.
    When the buffer is full it doubles, copying the filled rows once, so the copies cost O(1)
    amortised per token.
    """

    def __init__(self, cfg: Qwen2Config, batch: int, capacity: int = 256):
        shape = (cfg.num_hidden_layers, max(capacity, 1), batch, cfg.num_key_value_heads, cfg.head_dim)
        self.keys = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Store rows (layers, T, B, n_kv, hd) after the current ``length``."""
        t = keys.shape[1]
        if self.length + t > self.capacity:
            self._grow(max(2 * self.capacity, self.length + t))
        self.keys[:, self.length : self.length + t] = keys
        self.values[:, self.length : self.length + t] = values
        self.length += t

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the filled rows, (layers, length, B, n_kv, hd), as views into the buffers."""
        return self.keys[:, : self.length], self.values[:, : self.length]

    def _grow(self, capacity: int) -> None:
        def grown(buf: np.ndarray) -> np.ndarray:
            new = np.zeros(buf.shape[:1] + (capacity,) + buf.shape[2:], buf.dtype)
            new[:, : self.length] = buf[:, : self.length]
            return new

        self.keys = grown(self.keys)
        self.values = grown(self.values)


# --------------------------------------------------------------------------------------------
# Sampling (host side, on the returned logits)


@dataclass(frozen=True)
class SamplingConfig:
    """Next-token choice: ``temperature <= 0`` is greedy; otherwise top-k, then top-p (nucleus) sampling."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")


def sample_next(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Pick one token id per row of ``logits`` (B, V); greedy ties go to the lowest id."""
    if sampling.temperature <= 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    z = logits.astype(np.float64) / sampling.temperature  # (B, V)
    if sampling.top_k is not None and sampling.top_k < z.shape[-1]:
        kth = np.partition(z, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below top_p.
        keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < sampling.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((probs.shape[0], 1))
    choice = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(choice, probs.shape[-1] - 1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# The model


class Qwen2:
    """A Qwen2 causal LM over float32 weights on ``device`` ("cpu": compiled MAX graphs, "numpy": eager).

    ``params`` is ``{"lm_head": (D, V), "norm": (D,), "layers": {...}, "embed": (V, D)}``, where
    ``layers`` maps each weight name of ``modgrad.transformer.layers`` to an array stacked over
    layers, (n_layers, ...), and ``embed`` is absent when the input embedding is tied to ``lm_head``.
    """

    def __init__(self, config: Qwen2Config, params: dict, device: str = "cpu"):
        if device not in DEVICES:
            # TODO: "gpu" needs the cache and logits moved between host and device each step.
            raise ValueError(f"unknown device {device!r}; Qwen2 runs on {', '.join(DEVICES)}")
        self.config = config
        self.params = params
        self.device = device
        self._prefill: Callable = self._prefill_numpy
        self._decode: Callable = self._decode_numpy
        self._hidden_states: Callable | None = None  # built on first use: most callers never need it
        if device != "numpy":
            self._compile(device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "Qwen2":
        """Load ``config.json`` and the safetensors weights of a Hugging Face Qwen2 directory."""
        from modgrad.transformer.loader import load_qwen2

        config, params = load_qwen2(path)
        return cls(config, params, device=device)

    def _prefill_numpy(self, params, ids, positions, logit_rows):
        return prefill_forward(params, ids, positions, logit_rows, self.config)

    def _decode_numpy(self, params, ids, position, past_keys, past_values):
        return decode_forward(params, ids, position, past_keys, past_values, self.config)

    def _compile(self, device: str) -> None:
        import modgrad as mg

        cfg = self.config
        kv_shape = (cfg.num_hidden_layers, "L", "B", cfg.num_key_value_heads, cfg.head_dim)

        def qwen2_prefill(params, ids, positions, logit_rows):
            return prefill_forward(params, ids, positions, logit_rows, cfg)

        def qwen2_decode(params, ids, position, past_keys, past_values):
            return decode_forward(params, ids, position, past_keys, past_values, cfg)

        self._prefill = mg.compile(qwen2_prefill, device=device, dims=(None, ("B", "T"), ("T",), ("N",)))
        # The output head runs compiled too: in numpy its BLAS threads keep spinning after the call
        # and take a core from the next step's layers (2-core CPU: 145 against 95 ms per token).
        self._decode = mg.compile(
            qwen2_decode, device=device, dims=(None, ("B", 1), None, kv_shape, kv_shape), host_glue=False
        )

    # ----------------------------------------------------------------------------------------

    def _check_ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a (B, T) array of token ids with T >= 1, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
        vocab = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab}); check the tokenizer matches the model")
        return ids.astype(np.int64)

    def __call__(self, input_ids) -> np.ndarray:
        """Logits (B, T, V) for every position of ``input_ids`` (B, T), as float32 numpy."""
        ids = self._check_ids(input_ids)
        t = ids.shape[1]
        positions = np.arange(t, dtype=np.int64)
        logits, _, _ = self._prefill(self.params, ids, positions, positions)
        return np.asarray(logits)

    def hidden_states(self, input_ids) -> np.ndarray:
        """Compute the hidden states (layers, B, T, D) of ``input_ids`` (B, T) as float32 numpy.

        Layer l is the residual stream after decoder layer l; the last one has the final RMSNorm applied.
        """
        ids = self._check_ids(input_ids)
        positions = np.arange(ids.shape[1], dtype=np.int64)
        if self._hidden_states is None:
            cfg = self.config

            def qwen2_hidden_states(params, ids, positions):
                return hidden_states(params, ids, positions, cfg)

            if self.device == "numpy":
                self._hidden_states = qwen2_hidden_states
            else:
                import modgrad as mg

                dims = (None, ("B", "T"), ("T",))
                self._hidden_states = mg.compile(qwen2_hidden_states, device=self.device, dims=dims)
        return np.asarray(self._hidden_states(self.params, ids, positions))

    def prefill(self, input_ids, capacity: int | None = None) -> tuple[np.ndarray, KVCache]:
        """Run the prompt (B, T); return the last position's logits (B, V) and the filled cache."""
        ids = self._check_ids(input_ids)
        b, t = ids.shape
        positions = np.arange(t, dtype=np.int64)
        logits, keys, values = self._prefill(self.params, ids, positions, np.array([t - 1], np.int64))
        cache = KVCache(self.config, b, capacity or max(2 * t, 64))
        cache.append(keys, values)
        return np.asarray(logits)[:, 0], cache

    def decode(self, next_ids, cache: KVCache) -> np.ndarray:
        """Feed one token per row, (B,), after the cached ones; append its k, v; return logits (B, V)."""
        ids = self._check_ids(np.asarray(next_ids).reshape(-1, 1))
        position = np.array([cache.length], np.int64)
        past_keys, past_values = cache.view()
        logits, keys, values = self._decode(self.params, ids, position, past_keys, past_values)
        cache.append(keys, values)
        return np.asarray(logits)

    def stream(
        self,
        input_ids,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield the next token ids (B,) one step at a time; stops early once every row has emitted an EOS id.

        A row that has finished keeps yielding its EOS id while other rows continue.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = self._check_ids(input_ids)
        sampling = SamplingConfig(float(temperature), top_k, top_p)
        rng = np.random.default_rng(seed)
        stops = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id), np.int64)
        total = ids.shape[1] + max_new_tokens
        if total > self.config.max_position_embeddings:
            log.warning("generating up to %d positions, past max_position_embeddings=%d",
                        total, self.config.max_position_embeddings)
        if max_new_tokens == 0:
            return

        logits, cache = self.prefill(ids, capacity=total)
        done = np.zeros(ids.shape[0], bool)
        for step in range(max_new_tokens):
            next_ids = sample_next(logits, sampling, rng)  # (B,)
            if stops.size:
                next_ids = np.where(done, stops[0], next_ids)
                done |= np.isin(next_ids, stops)
            yield next_ids
            if done.all() or step == max_new_tokens - 1:
                return
            logits = self.decode(next_ids, cache)

    def generate(self, input_ids, max_new_tokens: int = 64, **kwargs) -> np.ndarray:
        """Return the prompt followed by up to ``max_new_tokens`` sampled ids, (B, T + n).

        Keyword arguments are those of :meth:`stream` (temperature, top_k, top_p, eos_token_id, seed);
        the default temperature 0 decodes greedily.
        """
        ids = self._check_ids(input_ids)
        start = time.perf_counter()
        new = list(self.stream(ids, max_new_tokens, **kwargs))
        if new:
            log.debug("generated %d tokens x %d rows in %.2f s", len(new), ids.shape[0], time.perf_counter() - start)
            return np.concatenate([ids, np.stack(new, axis=1)], axis=1)
        return ids
