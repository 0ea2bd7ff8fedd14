"""examples/lm_validate.py: short runs of the byte-level transformer, its JSON-lines log, plot and loss curve."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from modgrad.data import bigram_baseline, load_corpus, split_corpus

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "lm_validate.py"
TINY_MODEL = ["--d-model", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--seq-len", "16",
              "--batch", "4", "--eval-windows", "4", "--no-progress"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lm_validate():
    spec = importlib.util.spec_from_file_location("lm_validate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_run_writes_log_and_plot(lm_validate, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n" * 25)
    out = tmp_path / "out"
    summary = lm_validate.main([*TINY_MODEL, "--data", str(data), "--steps", "5", "--eval-every", "2",
                                "--out-dir", str(out)])

    records = read_log(out / "lm_validate.jsonl")
    assert records[0]["event"] == "start"
    assert records[0]["config"]["steps"] == 5
    assert records[-1]["event"] == "end"
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in train)
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert all(math.isfinite(r["held_out"]) for r in evals)

    plot = out / "lm_validate.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert not list(out.glob(".*.tmp"))

    train_bytes, held_out_bytes = split_corpus(load_corpus(data))
    assert summary["bigram"] == pytest.approx(bigram_baseline(train_bytes, held_out_bytes))
    assert summary["held_out_start"] == evals[0]["held_out"]
    assert summary["held_out_final"] == evals[-1]["held_out"]
    assert records[-1]["drop"] == pytest.approx(summary["held_out_start"] - summary["held_out_final"])


def test_loss_decreases_on_repeating_text(lm_validate, tmp_path):
    data = tmp_path / "repeat.txt"
    data.write_text("abcdefghij" * 300)
    out = tmp_path / "out"
    summary = lm_validate.main([*TINY_MODEL, "--data", str(data), "--steps", "30", "--eval-every", "0",
                                "--lr", "1e-2", "--warmup", "3", "--out-dir", str(out)])

    losses = [r["loss"] for r in read_log(out / "lm_validate.jsonl") if r["event"] == "train"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert summary["held_out_final"] < summary["held_out_start"] - 1.0, summary


def test_rejects_heads_not_dividing_width(lm_validate, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lm_validate.main(["--d-model", "10", "--heads", "3", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--heads 3 does not divide --d-model 10" in capsys.readouterr().err


def test_rejects_missing_data(lm_validate, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    with pytest.raises(SystemExit):
        lm_validate.main(["--data", str(missing), "--out-dir", str(tmp_path)])
    assert f"data file not found: {missing}" in capsys.readouterr().err
