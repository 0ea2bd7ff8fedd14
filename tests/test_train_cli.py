"""Byte corpora, checkpoints, the Trainer and the isis command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modgrad.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_paths,
    flatten_tree,
    load_brain,
    load_checkpoint,
    save_checkpoint,
)
from modgrad.data import (
    Corpus,
    CorpusError,
    WindowSampler,
    bigram_baseline,
    held_out_windows,
    load_corpus,
    split_corpus,
)
from modgrad.train import PRESET_NAMES, TrainConfig, Trainer, TrainError

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("MODGRAD_TEXT_CORPUS", REPO / "modgrad" / "corpus" / "tinyshakespeare.txt"))


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    """The first 6 KB of tinyshakespeare (override the source with MODGRAD_TEXT_CORPUS)."""
    if not CORPUS.is_file():
        pytest.skip(f"text corpus not found at {CORPUS}; set MODGRAD_TEXT_CORPUS")
    path = tmp_path_factory.mktemp("corpus") / "shakespeare6k.txt"
    path.write_bytes(CORPUS.read_bytes()[:6000])
    return path


def tiny_config(data: Path, **changes) -> TrainConfig:
    """A run of a few seconds on the numpy device."""
    settings = dict(
        data=str(data), preset="single_ctm", steps=4, batch=4, seq_len=8, ticks=2, embed_dim=16,
        lr=1e-2, warmup=1, eval_every=2, eval_windows=8, save_every=0, device="numpy",
    )
    settings.update(changes)
    return TrainConfig(**settings)


def run_isis(*args, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "modgrad.cli", *map(str, args)],
        input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=600,
    )


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# data


def test_load_corpus_missing(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nope.txt")


def test_load_corpus_empty(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "empty.txt")


def test_load_corpus_nul_bytes(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"text\x00more")
    with pytest.raises(CorpusError, match="binary .NUL byte at offset 4."):
        load_corpus(tmp_path / "bin.dat")


def test_load_corpus_invalid_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        load_corpus(tmp_path / "latin1.txt")


def test_load_corpus_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    tokens = load_corpus(tmp_path / "a.txt")
    assert tokens.dtype == np.uint8
    assert tokens.tolist() == list("héllo".encode("utf-8"))


def test_split_holds_out_last_tenth():
    tokens = np.arange(100, dtype=np.uint8)
    train, held = split_corpus(tokens)
    assert train.tolist() == list(range(90))
    assert held.tolist() == list(range(90, 100))


def test_corpus_too_short_for_window(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 50)
    with pytest.raises(CorpusError, match="held-out split has 5 bytes"):
        Corpus.load(tmp_path / "short.txt", seq_len=8)


def test_sampler_windows_are_contiguous():
    tokens = np.arange(200, dtype=np.int64)
    batch = WindowSampler(tokens, batch=5, seq_len=7, seed=3).sample()
    assert batch.shape == (5, 8)
    assert batch.dtype == np.int64
    assert np.all(np.diff(batch, axis=1) == 1)
    assert batch.min() >= 0
    assert batch.max() < 200


def test_sampler_state_restores_batches():
    tokens = np.arange(1000, dtype=np.int64)
    a = WindowSampler(tokens, 4, 16, seed=1)
    a.sample()
    saved = json.loads(json.dumps(a.state_dict()))  # the state survives JSON
    expected = [a.sample() for _ in range(3)]
    b = WindowSampler(tokens, 4, 16, seed=99)
    b.load_state_dict(saved)
    for want in expected:
        np.testing.assert_array_equal(b.sample(), want)


def test_held_out_windows_fixed_and_inside():
    held = np.arange(500, 600, dtype=np.int64)
    w1 = held_out_windows(held, 9, 6)
    w2 = held_out_windows(held, 9, 6)
    np.testing.assert_array_equal(w1, w2)
    assert w1.shape == (6, 10)
    assert w1[0, 0] == 500
    assert w1[-1, -1] == 599


def test_bigram_baseline_by_hand():
    train = np.frombuffer(b"abab", np.uint8)  # pairs ab, ba, ab
    held = np.frombuffer(b"aba", np.uint8)  # pairs ab, ba
    p_ab = (2 + 1) / (2 + 256)  # count(a, b) = 2, count(a, .) = 2
    p_ba = (1 + 1) / (1 + 256)  # count(b, a) = 1, count(b, .) = 1
    expected = -(math.log(p_ab) + math.log(p_ba)) / 2
    assert bigram_baseline(train, held) == pytest.approx(expected, rel=1e-12)


def test_bigram_baseline_unseen_context_is_uniform():
    train = np.frombuffer(b"aaaa", np.uint8)
    held = np.frombuffer(b"zq", np.uint8)  # context z never seen: P = 1/256
    assert bigram_baseline(train, held) == pytest.approx(math.log(256), rel=1e-12)


# --------------------------------------------------------------------------------------------
# checkpoints


def small_checkpoint() -> Checkpoint:
    params = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "layers": [{"b": np.ones(2, np.float32)}]}
    buffers = {"idx": np.array([3, 1], np.int64)}
    opt = {"step": np.array(7, np.int32), "m": params, "v": params}
    return Checkpoint(config={"x": 1}, params=params, buffers=buffers, trainer={"step": 7}, opt_state=opt)


def test_checkpoint_round_trip(tmp_path):
    paths = save_checkpoint(tmp_path / "m.safetensors", small_checkpoint())
    assert {p.name for p in tmp_path.iterdir()} == {"m.safetensors", "m.json", "m.opt.safetensors"}
    assert paths["config"].name == "m.json"
    ckpt = load_checkpoint(tmp_path / "m.safetensors", with_optimizer=True)
    np.testing.assert_array_equal(ckpt.params["a"]["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert isinstance(ckpt.params["layers"], list)
    assert ckpt.buffers["idx"].dtype == np.int64
    assert ckpt.opt_state["step"].dtype == np.int32
    assert int(ckpt.opt_state["step"]) == 7
    assert ckpt.config == {"x": 1}
    assert ckpt.trainer == {"step": 7}


def test_checkpoint_truncated(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", small_checkpoint())
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_checkpoint_mixed_saves(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", small_checkpoint())
    first = (tmp_path / "m.json").read_text()
    save_checkpoint(tmp_path / "m.safetensors", small_checkpoint())
    (tmp_path / "m.json").write_text(first)  # the JSON of an older save
    with pytest.raises(CheckpointError, match="different saves"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_checkpoint_corrupt_json(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", small_checkpoint())
    (tmp_path / "m.json").write_text('{"format": "modgrad-checkp')
    with pytest.raises(CheckpointError, match="config .* is corrupt or truncated"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_checkpoint_without_optimizer_cannot_resume(tmp_path):
    ckpt = small_checkpoint()
    ckpt.opt_state = None
    save_checkpoint(tmp_path / "m.safetensors", ckpt)
    assert not (tmp_path / "m.opt.safetensors").exists()
    with pytest.raises(CheckpointError, match="without optimizer state"):
        load_checkpoint(tmp_path / "m.safetensors", with_optimizer=True)


# --------------------------------------------------------------------------------------------
# training


def test_training_lowers_held_out_loss(shakespeare, tmp_path):
    """The default brain preset on a few KB of text: held-out loss falls within a few updates."""
    cfg = tiny_config(shakespeare, preset="eight_region_small", ticks=1, steps=6, eval_every=3, lr=1e-2)
    trainer = Trainer(cfg, tmp_path / "brain.safetensors", progress=False)
    summary = trainer.fit()
    held = [loss for _, loss in trainer.history["held_out"]]
    assert [s for s, _ in trainer.history["held_out"]] == [0, 3, 6]
    assert held[-1] < held[0] - 0.5, held
    assert summary["bigram"] == pytest.approx(bigram_baseline(trainer.corpus.train, trainer.corpus.held_out))
    png = (tmp_path / "brain.loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_matches_uninterrupted(shakespeare, tmp_path):
    full = Trainer(tiny_config(shakespeare, steps=6), tmp_path / "full.safetensors", progress=False)
    full.fit()

    half = Trainer(tiny_config(shakespeare, steps=6), tmp_path / "half.safetensors", progress=False)
    half.fit(stop_after=3)
    resumed = Trainer.resume(tmp_path / "half.safetensors", progress=False)
    assert resumed.step == 3
    resumed.fit()

    a = load_checkpoint(tmp_path / "full.safetensors", with_optimizer=True)
    b = load_checkpoint(tmp_path / "half.safetensors", with_optimizer=True)
    for name in ("params", "opt_state"):
        flat_a, flat_b = flatten_tree(getattr(a, name)), flatten_tree(getattr(b, name))
        assert flat_a.keys() == flat_b.keys()
        for path in flat_a:
            np.testing.assert_array_equal(flat_b[path], flat_a[path], err_msg=f"{name}/{path}")
    assert a.trainer["sampler"] == b.trainer["sampler"]
    assert a.trainer["history"] == b.trainer["history"]


def test_interrupt_then_resume_matches(shakespeare, tmp_path):
    """Ctrl-C during a step saves the last completed step; resuming replays the interrupted batch."""
    full = Trainer(tiny_config(shakespeare, steps=4, eval_every=0), tmp_path / "full.safetensors", progress=False)
    full.fit()

    trainer = Trainer(tiny_config(shakespeare, steps=4, eval_every=0), tmp_path / "cut.safetensors", progress=False)
    completed = []
    real_step = trainer.train_step

    def step_then_interrupt(tokens):
        if len(completed) == 2:
            raise KeyboardInterrupt  # after the batch was drawn, before the update
        completed.append(1)
        return real_step(tokens)

    trainer.train_step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert load_checkpoint(tmp_path / "cut.safetensors").trainer["step"] == 2

    resumed = Trainer.resume(tmp_path / "cut.safetensors", progress=False)
    resumed.fit()
    flat_full, flat_resumed = flatten_tree(full.params), flatten_tree(resumed.params)
    for path in flat_full:
        np.testing.assert_array_equal(flat_resumed[path], flat_full[path], err_msg=path)


def test_resume_rejects_changed_settings(shakespeare, tmp_path):
    Trainer(tiny_config(shakespeare, steps=2), tmp_path / "run.safetensors", progress=False).fit()
    with pytest.raises(TrainError, match="cannot change lr"):
        Trainer.resume(tmp_path / "run.safetensors", progress=False, steps=4, lr=0.5)


def test_load_brain_restores_empty_edges(shakespeare, tmp_path):
    Trainer(tiny_config(shakespeare, steps=1, eval_every=0), tmp_path / "run.safetensors", progress=False).fit()
    params, buffers, brain, trainer = load_brain(tmp_path / "run.safetensors")
    assert params["edges"] == []  # single_ctm has no connections
    assert brain.name == "single_ctm"
    assert trainer["step"] == 1


def test_train_config_rejects_unknown_preset(shakespeare):
    with pytest.raises(TrainError, match="valid presets: four_region, eight_region_small"):
        Trainer(tiny_config(shakespeare, preset="nine_region"), "unused.safetensors", progress=False)


@pytest.mark.max
@pytest.mark.slow
def test_compiled_training_matches_numpy(shakespeare, tmp_path):
    """The MAX-compiled train step gives the numpy reference's losses (float32, accumulated over steps).

    A cold run compiles about ten graphs (the token scan, the tick scans and their backward scans),
    which takes tens of minutes on a 2-core CPU.
    """
    runs = {}
    for device in ("numpy", "cpu"):
        trainer = Trainer(tiny_config(shakespeare, steps=3, ticks=1, eval_every=0, device=device),
                          tmp_path / f"{device}.safetensors", progress=False)
        trainer.fit()
        runs[device] = trainer
    train_np = [loss for _, loss in runs["numpy"].history["train"]]
    train_cpu = [loss for _, loss in runs["cpu"].history["train"]]
    np.testing.assert_allclose(train_cpu, train_np, rtol=2e-4)
    np.testing.assert_allclose(runs["cpu"].history["held_out"][-1][1], runs["numpy"].history["held_out"][-1][1], rtol=2e-4)


# --------------------------------------------------------------------------------------------
# the isis command line


@pytest.fixture(scope="module")
def trained(shakespeare, tmp_path_factory) -> Path:
    """A checkpoint of two numpy updates, written by isis train."""
    folder = tmp_path_factory.mktemp("ckpt")
    out = folder / "m.safetensors"
    result = run_isis("train", out, "--data", shakespeare, "--preset", "single_ctm", "--steps", 2, "--batch", 2,
                      "--seq-len", 8, "--ticks", 1, "--embed", 16, "--device", "numpy", "--no-progress",
                      "--eval-windows", 4)
    assert result.returncode == 0, result.stderr
    assert "held-out loss:" in result.stdout
    assert "bigram baseline:" in result.stdout
    return out


def assert_rejected(result, folder: Path, before: dict, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip(), "no message on stderr"
    for needle in needles:
        assert needle in result.stderr
    assert listing(folder) == before, "files were written or changed"


@pytest.mark.parametrize(
    "content, needle",
    [(None, "not found"), (b"", "empty"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe text", "not valid UTF-8")],
    ids=["missing", "empty", "binary", "not-utf8"],
)
def test_cli_train_bad_data(tmp_path, content, needle):
    data = tmp_path / "data.txt"
    if content is not None:
        data.write_bytes(content)
    before = listing(tmp_path)
    result = run_isis("train", tmp_path / "out.safetensors", "--data", data, "--device", "numpy", "--steps", 1)
    assert_rejected(result, tmp_path, before, needle)


def test_cli_train_unknown_preset(shakespeare, tmp_path):
    before = listing(tmp_path)
    result = run_isis("train", tmp_path / "out.safetensors", "--data", shakespeare, "--preset", "nine_region")
    assert_rejected(result, tmp_path, before, "nine_region", *PRESET_NAMES)


def test_cli_train_refuses_existing_checkpoint(trained):
    folder = trained.parent
    before = listing(folder)
    result = run_isis("train", trained, "--data", CORPUS, "--steps", 1, "--device", "numpy")
    assert_rejected(result, folder, before, "--resume")


def test_cli_generate_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint at all")
    (tmp_path / "bad.json").write_text("{}")
    before = listing(tmp_path)
    result = run_isis("generate", tmp_path / "bad.safetensors", "hi")
    assert_rejected(result, tmp_path, before, "bad.json")


def test_cli_generate_truncated_checkpoint(trained, tmp_path):
    data = trained.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "cut.json").write_bytes(checkpoint_paths(trained)["config"].read_bytes())
    before = listing(tmp_path)
    result = run_isis("generate", tmp_path / "cut.safetensors", "hi")
    assert_rejected(result, tmp_path, before, "corrupt or truncated")


def test_cli_generate_config_weights_mismatch(trained, tmp_path):
    document = json.loads(checkpoint_paths(trained)["config"].read_text())
    document["config"]["brain"]["raw_obs_dim"] = 24  # embeddings in the weights are 16 wide
    document["config"]["brain"]["obs_scale_dims"] = [24]
    (tmp_path / "m.safetensors").write_bytes(trained.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps(document))
    before = listing(tmp_path)
    result = run_isis("generate", tmp_path / "m.safetensors", "hi")
    assert_rejected(result, tmp_path, before, "do not match the config", "embeddings")


def test_cli_generate_out_of_vocab_token(trained):
    before = listing(trained.parent)
    result = run_isis("generate", trained, "--tokens", "72,300")
    assert_rejected(result, trained.parent, before, "token id 300", "0..255")


def test_cli_generate_negative_temperature(trained):
    before = listing(trained.parent)
    result = run_isis("generate", trained, "hi", "--temperature", "-0.5")
    assert_rejected(result, trained.parent, before, "--temperature must be >= 0")


def test_cli_generate_prints_prompt_and_sample(trained):
    result = run_isis("generate", trained, "ROMEO:", "--max-tokens", 12, "--temperature", 0, "--seed", 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")
    greedy_again = run_isis("generate", trained, "ROMEO:", "--max-tokens", 12, "--temperature", 0, "--seed", 2)
    assert greedy_again.stdout == result.stdout  # temperature 0 ignores the seed


def test_cli_nc_session(trained, tmp_path):
    saved = tmp_path / "chat.safetensors"
    script = f"hello\n/save {saved}\nagain\n/reset\n/quit\nnever read\n"
    result = run_isis("nc", trained, "--max-tokens", 5, "--seed", 0, stdin=script)
    assert result.returncode == 0, result.stderr
    assert "state reset" in result.stdout
    assert (tmp_path / "chat.ncstate.safetensors").exists()
    state = json.loads((tmp_path / "chat.ncstate.json").read_text())
    assert state["history"][:6] == list(b"hello\n")  # the line, then the sampled reply
    assert len(state["history"]) == 6 + 5

    resumed = run_isis("nc", saved, "--max-tokens", 3, "--seed", 0, stdin="/quit\n")
    assert resumed.returncode == 0, resumed.stderr
    assert "restored state" in resumed.stdout
    assert "11 tokens of history" in resumed.stdout


def test_cli_train_resume(shakespeare, tmp_path):
    out = tmp_path / "r.safetensors"
    common = ["--data", shakespeare, "--preset", "single_ctm", "--batch", 2, "--seq-len", 8, "--ticks", 1,
              "--embed", 16, "--device", "numpy", "--no-progress", "--eval-every", 0, "--eval-windows", 4]
    assert run_isis("train", out, "--steps", 1, *common).returncode == 0
    result = run_isis("train", out, "--steps", 2, "--resume", *common)
    assert result.returncode == 0, result.stderr
    assert "steps: 2" in result.stdout
    assert load_checkpoint(out).trainer["step"] == 2


def test_cli_devices():
    result = run_isis("devices")
    assert result.returncode == 0, result.stderr
    assert "cpu" in result.stdout
    assert "numpy" in result.stdout


def test_cli_help_names_units():
    result = run_isis("train", "--help")
    assert result.returncode == 0
    assert "nats/byte" in result.stdout
    assert "bytes predicted per window" in result.stdout
