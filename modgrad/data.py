"""Byte-level text data: load a corpus, split off a held-out tail, sample training windows, score a bigram baseline.

Tokens are bytes (ids 0-255), so any UTF-8 text file is a corpus. The last 10 % of the file is
held out for evaluation; training windows are drawn from the first 90 % only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_BYTES = 256
HELD_OUT_FRACTION = 0.1


class CorpusError(ValueError):
    """A data file that cannot be used as a text corpus (missing, empty, binary or too short)."""


def load_corpus(path: str | Path) -> np.ndarray:
    """Read a UTF-8 text file as byte tokens (uint8, one per byte).

    Raises CorpusError when the file is missing, empty, contains NUL bytes or is not valid UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"data file not found: {path}")
    if not path.is_file():
        raise CorpusError(f"data path is not a regular file: {path}")
    raw = path.read_bytes()
    if not raw:
        raise CorpusError(f"data file is empty: {path}")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"data file is binary (NUL byte at offset {nul}): {path}; pass a UTF-8 text file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"data file is not valid UTF-8 (byte {err.start}: {err.reason}): {path}; pass a UTF-8 text file"
        ) from None
    return np.frombuffer(raw, np.uint8).copy()


def split_corpus(tokens: np.ndarray, held_out: float = HELD_OUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Split into (train, held-out): the held-out part is the last ``held_out`` fraction of the bytes."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    n_held = max(1, int(round(len(tokens) * held_out)))
    if len(tokens) - n_held < 1:
        raise CorpusError(f"corpus of {len(tokens)} bytes is too short to split into train and held-out parts")
    return tokens[: len(tokens) - n_held], tokens[len(tokens) - n_held :]


def check_window_fits(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len + 1:
        raise CorpusError(
            f"the {what} split has {len(tokens)} bytes, fewer than one window of seq_len + 1 = {seq_len + 1}; "
            f"use a larger data file or a smaller --seq-len"
        )


class WindowSampler:
    """Draws batches of random windows (B, seq_len + 1) from a token array.

    Column 0..seq_len-1 are inputs and column 1..seq_len the next-byte targets. The generator
    state is exposed through ``state_dict`` / ``load_state_dict`` so a resumed run draws the same
    batches as an uninterrupted one.
    """

    def __init__(self, tokens: np.ndarray, batch: int, seq_len: int, seed: int = 0):
        if batch < 1 or seq_len < 1:
            raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
        check_window_fits(tokens, seq_len, "training")
        self.tokens = np.asarray(tokens, np.int64)
        self.batch = batch
        self.seq_len = seq_len
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self) -> np.ndarray:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch)  # (B,)
        offsets = np.arange(self.seq_len + 1)
        return self.tokens[starts[:, None] + offsets[None, :]]  # (B, L+1) int64

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def held_out_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to ``max_windows`` evenly spaced windows (N, seq_len + 1) covering the held-out split.

    The same windows are returned on every call, so held-out losses are comparable across steps.
    """
    check_window_fits(tokens, seq_len, "held-out")
    span = seq_len + 1
    n_fit = (len(tokens) - 1) // seq_len  # windows overlapping by one byte so every byte is a target once
    n = max(1, min(max_windows, n_fit))
    last_start = len(tokens) - span
    starts = np.linspace(0, last_start, n).round().astype(np.int64) if n > 1 else np.zeros(1, np.int64)
    return np.asarray(tokens, np.int64)[starts[:, None] + np.arange(span)[None, :]]


def bigram_baseline(train: np.ndarray, held_out: np.ndarray) -> float:
    """Held-out cross-entropy in nats/byte of an add-one-smoothed byte-bigram model fitted on ``train``.

    P(b | a) = (count(a, b) + 1) / (count(a) + 256), averaged over the consecutive pairs of
    ``held_out``; the first held-out byte has no predecessor there and is not scored.
    """
    train = np.asarray(train, np.int64)
    held_out = np.asarray(held_out, np.int64)
    if len(held_out) < 2:
        raise CorpusError(f"the held-out split has {len(held_out)} byte(s); a bigram score needs at least 2")
    counts = np.zeros((VOCAB_BYTES, VOCAB_BYTES), np.float64)
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    probs = (counts + 1.0) / (counts.sum(1, keepdims=True) + VOCAB_BYTES)
    return float(-np.mean(np.log(probs[held_out[:-1], held_out[1:]])))


@dataclass(frozen=True)
class Corpus:
    """A loaded text corpus split into train and held-out byte tokens."""

    path: str
    train: np.ndarray
    held_out: np.ndarray

    @classmethod
    def load(cls, path: str | Path, seq_len: int) -> "Corpus":
        """Load, split and check that both splits hold at least one window of ``seq_len + 1`` bytes."""
        tokens = load_corpus(path)
        train, held_out = split_corpus(tokens)
        check_window_fits(train, seq_len, "training")
        check_window_fits(held_out, seq_len, "held-out")
        return cls(str(path), train, held_out)
