"""Maze training: model sizes, the two protocols' optimisers, smoke runs, baselines and the result line.

Everything runs eagerly on numpy with tiny models (9 x 9 mazes, few ticks) so the module stays fast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import modgrad as mg
from modgrad import ops
from modgrad.engine.pytree import tree_flatten
from modgrad.losses import StepwiseCE
from modgrad.mazes import MazeDataset
from modgrad.mazes.train import (
    MazeTrainConfig,
    build_model,
    make_optimizer,
    make_train_step,
    plot_curves,
    render_predictions,
    save_history,
    train_mazes,
    trivial_baselines,
)
from modgrad.optim import tree_paths

SUMMARY_FIELDS = {"model", "protocol", "gradients", "params", "steps", "seed", "size", "device", "first_step", "per_step",
                  "correct_prefix", "n_mazes", "first_step_s", "steps_per_s", "wall_s"}


def tiny(model: str, protocol: str, **changes) -> MazeTrainConfig:
    """A run small enough for tests: 9 x 9 mazes (5 x 5 tokens), 2-4 ticks, a 32-neuron CTM."""
    settings = dict(model=model, protocol=protocol, size=9, ticks=4 if model == "ctm" else 2, d_model=32,
                    heldout=16, device="numpy")
    settings.update(changes)
    return MazeTrainConfig(**settings)


def leaf(tree, path: str) -> np.ndarray:
    leaves = tree_flatten(tree)[0]
    return np.asarray(leaves[tree_paths(tree).index(path)])


# --------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize(
    "model, protocol, expected",
    [("ctm", "reference", 450_325), ("brain", "reference", 187_881), ("brain", "fair", 189_673)],
)
def test_benchmark_model_sizes(model, protocol, expected):
    assert build_model(MazeTrainConfig(model=model, protocol=protocol)).n_params == expected


def test_brain_observation_per_protocol():
    reference = build_model(tiny("brain", "reference"))
    fair = build_model(tiny("brain", "fair"))
    assert not reference.config.is_spatial
    assert fair.config.spatial_tokens == 25 and fair.config.spatial_regions == (0,)

    tokens = np.random.default_rng(0).standard_normal((2, 25, 128)).astype(np.float32)
    moved = tokens.copy()
    moved[:, 12] += 1.0  # the centre cell; the reference brain reads only token 0
    for model, should_change in ((reference, False), (fair, True)):
        before, _ = model.forward(model.params, model.buffers, tokens)
        after, _ = model.forward(model.params, model.buffers, moved)
        assert before.shape == (2, 2, 100)
        assert (np.abs(after - before).max() > 1e-6) == should_change


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown model"):
        MazeTrainConfig(model="rnn")
    with pytest.raises(ValueError, match="unknown protocol"):
        MazeTrainConfig(protocol="other")
    with pytest.raises(ValueError, match="size must be at least 5"):
        MazeTrainConfig(size=3)
    with pytest.raises(ValueError, match="unknown gradients 'approximate'"):
        MazeTrainConfig(model="brain", gradients="approximate")
    with pytest.raises(ValueError, match="brain only"):
        MazeTrainConfig(model="ctm", gradients="truncated")
    assert MazeTrainConfig().grad_clip == 5.0
    assert MazeTrainConfig(protocol="fair").grad_clip == 1.0


# --------------------------------------------------------------------------------------------
# Optimisers


@pytest.fixture(scope="module")
def fixed_batch():
    return MazeDataset(size=9, seed=3, batch_size=8).next_batch()


def one_step(cfg: MazeTrainConfig, batch):
    model = build_model(cfg)
    opt = make_optimizer(cfg)
    step = make_train_step(model, cfg, opt)
    _, _, _, params, _ = step(model.params, opt.init(model.params), model.buffers, batch.tokens, batch.targets)
    return model, params


def test_reference_ctm_update_is_clipped_sgd(fixed_batch):
    cfg = tiny("ctm", "reference", lr=0.05, clip=0.5)
    model, new = one_step(cfg, fixed_batch)

    def summed(params):
        preds, cert = model.forward(params, model.buffers, fixed_batch.tokens)
        return ops.sum(StepwiseCE().per_example(preds, fixed_batch.targets, cert))

    _, grads = mg.value_and_grad(summed)(model.params)
    subset = ("nlm/stage1/w", "nlm/stage1/b", "output_proj/w", "output_proj/b", "q_proj/w")
    norm = np.sqrt(sum(np.sum(leaf(grads, p).astype(np.float64) ** 2) for p in subset))
    assert norm > 0.5, "the test needs a gradient large enough to be clipped"
    scale = cfg.lr / cfg.batch * min(1.0, cfg.grad_clip / norm)
    for path in ("nlm/stage1/w", "synapse/first/linear/w", "mha_in/w", "start_activated", "output_proj/b"):
        expected = leaf(model.params, path) - scale * leaf(grads, path)
        np.testing.assert_allclose(leaf(new, path), expected, rtol=1e-4, atol=1e-7, err_msg=path)
    for path in ("kv_proj/w", "kv_ln/g", "start_trace", "decay_out", "exit_gate/w"):
        np.testing.assert_array_equal(leaf(new, path), leaf(model.params, path), err_msg=path)


def test_reference_brain_trains_reference_subset(fixed_batch):
    cfg = tiny("brain", "reference")
    model, new = one_step(cfg, fixed_batch)
    changed = ("edges/0/w", "output_proj/w", "regions/2/nlm/stage1/w", "regions/0/kv_proj/w")
    for path in changed:
        assert np.abs(leaf(new, path) - leaf(model.params, path)).max() > 0, path
    frozen = ("regions/0/synapse/first/linear/w", "regions/1/start_trace", "regions/3/kv_ln/g",
              "regions/0/decay_out", "global_decay", "extra_heads/0/w", "obs_proj/b")
    for path in frozen:
        np.testing.assert_array_equal(leaf(new, path), leaf(model.params, path), err_msg=path)
    # Weights outside the gradient subset still shrink by AdamW's decoupled weight decay.
    old, now = leaf(model.params, "regions/1/nlm/stage2/w"), leaf(new, "regions/1/nlm/stage2/w")
    ratio = now[np.abs(old) > 1e-3] / old[np.abs(old) > 1e-3]
    assert np.all(ratio < 1.0) and np.allclose(ratio, ratio[0], rtol=1e-5)


def test_fair_protocol_trains_every_input_path(fixed_batch):
    for model_name, paths in (("ctm", ("kv_proj/w", "start_trace", "synapse/first/linear/w")),
                              ("brain", ("regions/0/kv_proj/w", "regions/0/q_proj/w", "regions/1/synapse/first/linear/w"))):
        model, new = one_step(tiny(model_name, "fair"), fixed_batch)
        for path in paths:
            assert np.abs(leaf(new, path) - leaf(model.params, path)).max() > 0, (model_name, path)


def test_truncated_step_same_loss_other_norm(fixed_batch):
    outputs = {}
    for gradients in ("exact", "truncated"):
        cfg = tiny("brain", "reference", ticks=3, gradients=gradients)
        model = build_model(cfg)
        opt = make_optimizer(cfg)
        step = make_train_step(model, cfg, opt)
        loss, last, norm, _, _ = step(model.params, opt.init(model.params), model.buffers, fixed_batch.tokens,
                                      fixed_batch.targets)
        outputs[gradients] = float(loss), np.asarray(last), float(norm)
    assert outputs["truncated"][0] == pytest.approx(outputs["exact"][0], rel=1e-6)
    np.testing.assert_allclose(outputs["truncated"][1], outputs["exact"][1], rtol=1e-5, atol=1e-6)
    assert outputs["truncated"][2] != pytest.approx(outputs["exact"][2], rel=1e-3)


# --------------------------------------------------------------------------------------------
# Smoke runs


@pytest.mark.parametrize(
    "model, protocol, lr",
    [("ctm", "reference", 0.05), ("ctm", "fair", 3e-3), ("brain", "reference", 3e-3), ("brain", "fair", 3e-3)],
)
def test_loss_falls_on_fixed_batch(model, protocol, lr, fixed_batch):
    cfg = tiny(model, protocol, lr=lr)
    built = build_model(cfg)
    opt = make_optimizer(cfg)
    step = make_train_step(built, cfg, opt)
    params, state = built.params, opt.init(built.params)
    losses = []
    for _ in range(50):
        loss, _, norm, params, state = step(params, state, built.buffers, fixed_batch.tokens, fixed_batch.targets)
        losses.append(float(loss))
        assert np.isfinite(float(norm))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("model", ["ctm", "brain"])
def test_run_reports_all_metrics(model, tmp_path):
    run = train_mazes(tiny(model, "fair", steps=3, eval_every=2), progress=False)
    summary = json.loads(json.dumps(run.summary()))
    assert set(summary) == SUMMARY_FIELDS
    for name in ("first_step", "per_step"):
        assert 0.0 <= summary[name] <= 1.0
    assert 0.0 <= summary["correct_prefix"] <= 20.0
    assert summary["n_mazes"] == 16 and summary["steps"] == 3
    assert [row[0] for row in run.history["train"]] == [1, 2, 3]
    assert [row[0] for row in run.history["eval"]] == [2, 3]

    history = json.loads(save_history(tmp_path / "h.json", run).read_text())
    assert history["summary"] == summary
    heldout = MazeDataset(size=9, seed=42).heldout(16)
    png = render_predictions(tmp_path / "r.png", heldout, run.heldout_moves, count=4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = plot_curves(tmp_path / "c.png", [tmp_path / "h.json"] * 2, trivial_baselines(size=21, heldout=8, fit_mazes=10))
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model", ["ctm", "brain"])
def test_checkpointed_run_continues_exactly(model, tmp_path):
    """Two steps, a save, and a second run's two more steps equal four steps in one run."""
    whole = train_mazes(tiny(model, "fair", steps=4, eval_every=2), progress=False)
    path = str(tmp_path / "run.safetensors")
    train_mazes(tiny(model, "fair", steps=2, eval_every=2, checkpoint=path), progress=False)
    continued = train_mazes(tiny(model, "fair", steps=4, eval_every=2, checkpoint=path), progress=False)

    assert [row[:4] for row in continued.history["train"]] == [row[:4] for row in whole.history["train"]]
    assert continued.history["eval"] == whole.history["eval"]
    for got, want in zip(tree_flatten(continued.params)[0], tree_flatten(whole.params)[0], strict=True):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_of_other_settings_is_rejected(tmp_path):
    path = str(tmp_path / "run.safetensors")
    train_mazes(tiny("ctm", "fair", steps=1, checkpoint=path), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        train_mazes(tiny("ctm", "fair", steps=2, lr=1e-3, checkpoint=path), progress=False)


def test_old_checkpoint_resumes_as_exact(tmp_path):
    from modgrad.checkpoint import checkpoint_paths

    path = str(tmp_path / "run.safetensors")
    train_mazes(tiny("brain", "fair", steps=1, checkpoint=path), progress=False)
    config = checkpoint_paths(path)["config"]
    saved = json.loads(config.read_text())
    del saved["trainer"]["settings"]["gradients"]  # as written before the setting existed
    config.write_text(json.dumps(saved))
    continued = train_mazes(tiny("brain", "fair", steps=2, checkpoint=path), progress=False)
    assert [row[0] for row in continued.history["train"]] == [1, 2]
    with pytest.raises(ValueError, match=r"other settings \(gradients\)"):
        train_mazes(tiny("brain", "fair", steps=3, gradients="truncated", checkpoint=path), progress=False)


# --------------------------------------------------------------------------------------------
# Baselines


def test_trivial_baselines_first_move():
    scores = trivial_baselines(size=21, heldout=40, fit_mazes=50)
    assert set(scores) == {"always_down", "always_right", "majority", "open_neighbour"}
    # Row 0 and column 0 are walls, so every route starts with Down or Right.
    assert scores["always_down"]["first_step"] + scores["always_right"]["first_step"] == pytest.approx(1.0)
    assert scores["open_neighbour"]["first_step"] >= max(scores["always_down"]["first_step"],
                                                        scores["always_right"]["first_step"])
    for s in scores.values():
        assert s["n_mazes"] == 40
        assert 0.0 <= s["per_step"] <= 1.0


def test_example_rejects_history_on_checkpoint_file(tmp_path):
    """The history JSON may not take the name of the checkpoint's own JSON file."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "mazes.py"
    result = subprocess.run(
        [sys.executable, str(script), "--steps", "1", "--checkpoint", str(tmp_path / "run.safetensors"),
         "--history", str(tmp_path / "run.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "is one of the files of --checkpoint" in result.stderr
    assert not (tmp_path / "run.safetensors").exists()
