"""NeuralComputer: a brain that keeps its state from token to token, with sampling and chat.

Each ``step`` runs one token through every outer tick with the persistent state and returns the
last outer tick's logits. Region sync accumulators restart at each region call, as in the
reference's inference path; region traces and activations, and the global sync, persist.
Departures from the reference's inference path: every region runs all its ticks and the brain
all its outer ticks (no early exit), and the hippocampus has no episodic key-value memory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from modgrad import ops
from modgrad.files import atomic_write
from modgrad.graph.brain import brain_step, init_brain_state
from modgrad.graph.config import RegionalConfig

log = logging.getLogger(__name__)

LCG_MULTIPLIER = 6364136223846793005
LCG_INCREMENT = 1442695040888963407
MASK64 = (1 << 64) - 1

VID_START = 260  # a video segment begins: chat stops
ACT_START = 9132  # an action segment begins: chat stops
MAX_NON_TEXT_STREAK = 5  # chat stops after more consecutive non-byte tokens than this
SAVE_FORMAT = "modgrad.neural_computer"
SAVE_VERSION = 1


def _flatten_state(state: dict) -> dict[str, np.ndarray]:
    flat = {"global_alpha": state["global_alpha"], "global_beta": state["global_beta"]}
    for r, region in enumerate(state["regions"]):
        for key, value in region.items():
            flat[f"regions.{r}.{key}"] = value
    return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def _unflatten_state(flat: dict[str, np.ndarray], n_regions: int) -> dict:
    regions: list[dict] = [{} for _ in range(n_regions)]
    for name, value in flat.items():
        if name.startswith("regions."):
            _, r, key = name.split(".", 2)
            regions[int(r)][key] = value
    return {"regions": regions, "global_alpha": flat["global_alpha"], "global_beta": flat["global_beta"]}


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file saved beside the arrays: ``x.safetensors`` -> ``x.json``, other names get ``.json`` appended."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix == ".safetensors" else path.with_name(path.name + ".json")


class NeuralComputer:
    """A brain with persistent state, a token history and a seedable sampler.

    seed: initial state of the sampler's 64-bit LCG; None seeds it from the wall clock in
    nanoseconds, as the reference does. device: "numpy" runs the step eagerly; "cpu" compiles
    the step with MAX on the first call (minutes, then cached on disk).
    """

    # NOTE: device="cpu" is covered only by a slow test, because compiling every region's tick
    # loop takes many minutes on a 2-core CPU.

    def __init__(
        self,
        params: dict,
        buffers: dict,
        cfg: RegionalConfig,
        seed: int | None = None,
        max_history: int = 4096,
        device: str = "numpy",
    ):
        self.params, self.buffers, self.cfg = params, buffers, cfg
        if device not in ("numpy", "cpu"):
            raise ValueError(f"NeuralComputer device must be 'numpy' or 'cpu', got {device!r}")
        self.rng_state = (time.time_ns() if seed is None else int(seed)) & MASK64
        self.max_history = max_history
        self.device = device
        self._compiled_step = None
        self.reset()

    # ----------------------------------------------------------------------------------------
    # State

    def reset(self) -> None:
        """Return the brain to its start state and clear the history; the sampler keeps its state."""
        self.state = init_brain_state(self.params, self.cfg, 1)
        self.history: list[int] = []
        self.last_logits: np.ndarray | None = None

    def _run_step(self, obs: np.ndarray):
        if self.device == "numpy":
            return brain_step(self.params, self.buffers, self.cfg, obs, self.state, restart_sync=True)
        if self._compiled_step is None:
            import modgrad as mg

            cfg = self.cfg

            def step(params, buffers, obs, state):
                return brain_step(params, buffers, cfg, obs, state, restart_sync=True)

            self._compiled_step = mg.compile(step, device=self.device, name=f"nc_{cfg.name}")
        return self._compiled_step(self.params, self.buffers, obs, self.state)

    def _check_token(self, token) -> int:
        token = int(token)
        if not 0 <= token < self.cfg.out_dims:
            raise ValueError(
                f"token id {token} is outside the brain's vocabulary of {self.cfg.out_dims} ids (0..{self.cfg.out_dims - 1})"
            )
        return token

    def step(self, token: int) -> np.ndarray:
        """Feed one token; return the last outer tick's logits (out_dims,)."""
        token = self._check_token(token)
        obs = ops.gather(self.params["embeddings"], np.asarray([token], np.int64), axis=0)  # (1, raw)
        logits, state = self._run_step(obs)
        self.state = {
            "regions": [{k: np.asarray(v) for k, v in s.items()} for s in state["regions"]],
            "global_alpha": np.asarray(state["global_alpha"]),
            "global_beta": np.asarray(state["global_beta"]),
        }
        self.history.append(token)
        if len(self.history) > self.max_history:
            del self.history[: len(self.history) - self.max_history]
        self.last_logits = np.asarray(logits)[0, -1]
        return self.last_logits

    def observe(self, tokens) -> np.ndarray:
        """Feed tokens in order; return the logits after the last one.

        An empty sequence returns the logits of the last step (ValueError if nothing was fed yet).
        """
        tokens = [self._check_token(t) for t in tokens]
        for token in tokens:
            self.step(token)
        if self.last_logits is None:
            raise ValueError("observe received no tokens and the computer has not seen any yet; pass at least one token")
        return self.last_logits

    # ----------------------------------------------------------------------------------------
    # Sampling

    def next_uniform(self) -> float:
        """Advance the LCG and return (state >> 33) / 2^31, in [0, 1)."""
        self.rng_state = (self.rng_state * LCG_MULTIPLIER + LCG_INCREMENT) & MASK64
        return (self.rng_state >> 33) / float(1 << 31)

    def sample(self, logits, temperature: float) -> int:
        """Draw a token id from softmax(logits / temperature); temperature 0 takes the argmax.

        Among tied maxima the argmax returns the last index. Sampling returns the first index
        whose cumulative probability reaches a uniform draw of the LCG.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        logits = np.asarray(logits, np.float64).reshape(-1)
        if temperature == 0:
            return int(len(logits) - 1 - np.argmax(logits[::-1]))
        e = np.exp((logits - logits.max()) / temperature)
        cumulative = np.cumsum(e / e.sum())
        u = self.next_uniform()
        index = int(np.searchsorted(cumulative, u, side="left"))
        return min(index, len(logits) - 1)

    def generate(self, tokens, n: int, temperature: float = 1.0) -> list[int]:
        """Observe ``tokens``, then sample and feed back ``n`` tokens; return the sampled ids."""
        logits = self.observe(tokens)
        out = []
        for _ in range(n):
            token = self.sample(logits, temperature)
            out.append(token)
            logits = self.step(token)
        return out

    def chat(self, text: str, max_tokens: int = 256, temperature: float = 0.8) -> str:
        """Feed ``text`` as UTF-8 bytes and sample a reply of at most ``max_tokens`` tokens.

        Bytes (ids < 256) form the reply. A VID_START or ACT_START token ends it, and so do more
        than 5 other non-byte tokens in a row. Every sampled token, text or not, is fed back.
        """
        logits = self.observe(list(text.encode("utf-8")))
        reply = bytearray()
        streak = 0
        for _ in range(max_tokens):
            token = self.sample(logits, temperature)
            if token < 256:
                reply.append(token)
                streak = 0
            elif token in (ACT_START, VID_START):
                break
            else:
                streak += 1
                if streak > MAX_NON_TEXT_STREAK:
                    break
            logits = self.step(token)
        return reply.decode("utf-8", errors="replace")

    # ----------------------------------------------------------------------------------------
    # Persistence

    def save(self, path: str | os.PathLike) -> None:
        """Save the recurrent state (safetensors at ``path``) and history + sampler state (JSON beside it).

        Weights are not saved; ``load`` needs a computer built with the same weights and config.
        """
        from safetensors.numpy import save_file

        path = Path(path)
        arrays = _flatten_state(self.state)
        if self.last_logits is not None:
            arrays["last_logits"] = np.ascontiguousarray(self.last_logits)
        meta = {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "history": self.history,
            "rng_state": self.rng_state,
            "max_history": self.max_history,
            "config": self.cfg.to_dict(),
        }
        atomic_write(path, lambda tmp: save_file(arrays, tmp))
        atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(json.dumps(meta)))
        log.info("saved neural computer state to %s (%d tokens of history)", path, len(self.history))

    def load(self, path: str | os.PathLike) -> None:
        """Restore the state written by ``save``: recurrent arrays, history and sampler state."""
        from safetensors.numpy import load_file

        path = Path(path)
        meta_path = sidecar_path(path)
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"need both {path} and {meta_path}; write them with NeuralComputer.save")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != SAVE_FORMAT:
            raise ValueError(f"{meta_path} is not a neural computer save (format {meta.get('format')!r})")
        if RegionalConfig.from_dict(meta["config"]) != self.cfg:
            raise ValueError(f"{path} was saved from a brain with a different config; build the computer from that config")

        arrays = load_file(str(path))
        last_logits = arrays.pop("last_logits", None)
        expected = _flatten_state(self.state)
        if set(arrays) != set(expected):
            raise ValueError(f"{path} holds state arrays {sorted(set(arrays) ^ set(expected))} that this brain does not match")
        for name, value in arrays.items():
            if value.shape != expected[name].shape:
                raise ValueError(f"state array {name} in {path} has shape {value.shape}, expected {expected[name].shape}")

        self.state = _unflatten_state(arrays, self.cfg.n_regions)
        self.history = [int(t) for t in meta["history"]]
        self.rng_state = int(meta["rng_state"]) & MASK64
        self.max_history = int(meta["max_history"])
        self.last_logits = last_logits
