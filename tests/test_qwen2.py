"""Qwen2 against transformers' Qwen2ForCausalLM on tiny random checkpoints.

Tolerance (float32 throughout): logits agree to rtol 1e-4, with an absolute floor of 1e-5 x the
largest reference logit for entries near zero. Greedy generations must be identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from modgrad.transformer import KVCache, Qwen2, Qwen2Config, SamplingConfig  # noqa: E402
from modgrad.transformer.loader import load_chat_template, read_config  # noqa: E402
from modgrad.transformer.qwen2 import sample_next  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-4

# name -> (transformers.Qwen2Config kwargs, save_pretrained kwargs)
SHAPES = {
    "tied_kv1_odd": (dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=72,
                          num_hidden_layers=2, vocab_size=97, tie_word_embeddings=True), {}),
    "untied_gqa": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                        num_hidden_layers=3, vocab_size=131, tie_word_embeddings=False), {}),
    "untied_mha_sharded": (dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=6, intermediate_size=50,
                                num_hidden_layers=2, vocab_size=89, tie_word_embeddings=False, rope_theta=1e6),
                           dict(max_shard_size="20KB")),
    "tied_gqa_bf16": (dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=80,
                           num_hidden_layers=2, vocab_size=101, tie_word_embeddings=True), dict(bf16=True)),
}


def _build(path: Path, hf_kwargs: dict, save_kwargs: dict, seed: int = 0):
    """Save a random Qwen2ForCausalLM to ``path``; return it in float32 eval mode."""
    save_kwargs = dict(save_kwargs)
    bf16 = save_kwargs.pop("bf16", False)
    kwargs = dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512)
    kwargs.update(hf_kwargs)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs)).eval()
    with torch.no_grad():
        # The default init zeroes biases and sets norms to 1; randomise every tensor so each one matters.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, **save_kwargs)
    if bf16:
        # Reload in float32: casting the model back would keep the rotary frequencies rounded to bf16.
        model = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    out = {}
    for name, (hf_kwargs, save_kwargs) in SHAPES.items():
        out[name] = (root / name, _build(root / name, hf_kwargs, save_kwargs))
    return out


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _hf_greedy(model, ids: np.ndarray, n: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out.numpy()


def _assert_logits_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=1e-5 * np.abs(ref).max())


def _prompt(vocab: int, batch: int = 2, length: int = 13, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Parity on the numpy path


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(checkpoints, name):
    path, hf = checkpoints[name]
    model = Qwen2.from_pretrained(path, device="numpy")
    ids = _prompt(model.config.vocab_size)
    _assert_logits_close(model(ids), _hf_logits(hf, ids))


@pytest.mark.parametrize("name", ["tied_kv1_odd", "untied_gqa", "tied_gqa_bf16"])
def test_greedy_generation_matches_transformers(checkpoints, name):
    path, hf = checkpoints[name]
    model = Qwen2.from_pretrained(path, device="numpy")
    ids = _prompt(model.config.vocab_size, batch=2, length=5, seed=2)
    ours = model.generate(ids, max_new_tokens=32)
    assert ours.shape == (2, 5 + 32)
    np.testing.assert_array_equal(ours, _hf_greedy(hf, ids, 32))


def test_config_reads_hf_fields(checkpoints):
    path, hf = checkpoints["untied_mha_sharded"]
    cfg = read_config(path)
    assert cfg.hidden_size == 36
    assert cfg.num_attention_heads == 6
    assert cfg.num_key_value_heads == 6
    assert cfg.head_dim == 6
    assert cfg.rope_theta == 1e6
    assert not cfg.tie_word_embeddings
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())


def test_config_reads_top_level_rope_theta():
    raw = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 12345.0}
    assert Qwen2Config.from_hf(raw).rope_theta == 12345.0


def test_qwen2_5_0_5b_parameter_count():
    assert Qwen2Config().num_params() == 494_032_768


def test_sharded_checkpoint_has_index(checkpoints):
    path, _ = checkpoints["untied_mha_sharded"]
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1


# --------------------------------------------------------------------------------------------
# Key/value cache


def test_cached_decode_matches_full_recompute(checkpoints):
    path, _ = checkpoints["untied_gqa"]
    model = Qwen2.from_pretrained(path, device="numpy")
    ids = _prompt(model.config.vocab_size, batch=3, length=10, seed=3)
    full = model(ids)  # (B, T, V)

    logits, cache = model.prefill(ids[:, :4], capacity=5)  # capacity 5 forces one buffer growth
    _assert_logits_close(logits, full[:, 3])
    for t in range(4, ids.shape[1]):
        logits = model.decode(ids[:, t], cache)
        _assert_logits_close(logits, full[:, t])
    assert cache.length == ids.shape[1]
    assert cache.capacity >= ids.shape[1]


def test_kv_cache_append_keeps_rows():
    cfg = Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4)
    cache = KVCache(cfg, batch=2, capacity=2)
    rows = np.random.default_rng(0).standard_normal((2, 3, 2, 1, 4)).astype(np.float32)  # (layers, T, B, n_kv, hd)
    cache.append(rows, -rows)
    cache.append(rows[:, :1], -rows[:, :1])
    keys, values = cache.view()
    assert keys.shape == (2, 4, 2, 1, 4)
    assert keys[1].flags.c_contiguous
    np.testing.assert_array_equal(keys[:, :3], rows)
    np.testing.assert_array_equal(values[:, 3], -rows[:, 0])


# --------------------------------------------------------------------------------------------
# Sampling


def test_sampling_top_k_one_is_greedy():
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    rng = np.random.default_rng(0)
    picked = sample_next(logits, SamplingConfig(temperature=1.5, top_k=1), rng)
    np.testing.assert_array_equal(picked, logits.argmax(-1))


def test_sampling_small_top_p_is_greedy():
    logits = np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32) * 3
    picked = sample_next(logits, SamplingConfig(temperature=0.7, top_p=1e-6), np.random.default_rng(0))
    np.testing.assert_array_equal(picked, logits.argmax(-1))


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.1, 0.2, 0.7]], np.float32)).repeat(20000, axis=0)
    picked = sample_next(logits, SamplingConfig(temperature=1.0), np.random.default_rng(0))
    freq = np.bincount(picked, minlength=3) / picked.size
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.015)


def test_sampling_top_k_excludes_tail():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)).repeat(5000, axis=0)
    picked = sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), np.random.default_rng(0))
    assert set(np.unique(picked)) == {2, 3}


def test_generate_with_seed_is_reproducible(checkpoints):
    path, _ = checkpoints["tied_kv1_odd"]
    model = Qwen2.from_pretrained(path, device="numpy")
    ids = _prompt(model.config.vocab_size, batch=2, length=4)
    kwargs = dict(max_new_tokens=8, temperature=0.7, top_k=50, top_p=0.9, seed=7)
    first = model.generate(ids, **kwargs)
    np.testing.assert_array_equal(first, model.generate(ids, **kwargs))
    assert first.shape == (2, 12)
    assert first.max() < model.config.vocab_size


def test_generate_stops_at_eos(checkpoints):
    path, _ = checkpoints["tied_kv1_odd"]
    model = Qwen2.from_pretrained(path, device="numpy")
    ids = _prompt(model.config.vocab_size, batch=1, length=4)
    greedy = model.generate(ids, max_new_tokens=6)
    eos = int(greedy[0, 6])  # the third generated token
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=eos)
    np.testing.assert_array_equal(stopped, greedy[:, : 4 + np.argmax(greedy[0, 4:] == eos) + 1])


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Qwen2.from_pretrained(tmp_path / "nope", device="numpy")


def test_missing_config_raises(checkpoints, tmp_path):
    path, _ = checkpoints["tied_kv1_odd"]
    shutil.copytree(path, tmp_path / "m")
    os.remove(tmp_path / "m" / "config.json")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        Qwen2.from_pretrained(tmp_path / "m", device="numpy")


def test_missing_shard_raises(checkpoints, tmp_path):
    path, _ = checkpoints["untied_mha_sharded"]
    shutil.copytree(path, tmp_path / "m")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=f"shard '{shard.name}'"):
        Qwen2.from_pretrained(tmp_path / "m", device="numpy")


def test_missing_weights_raises(checkpoints, tmp_path):
    path, _ = checkpoints["tied_kv1_odd"]
    shutil.copytree(path, tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Qwen2.from_pretrained(tmp_path / "m", device="numpy")


def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def test_wrong_tensor_shape_raises(checkpoints, tmp_path):
    path, _ = checkpoints["tied_kv1_odd"]
    shutil.copytree(path, tmp_path / "m")
    _edit_config(tmp_path / "m", intermediate_size=80)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[72, 40\].*\[80, 40\]"):
        Qwen2.from_pretrained(tmp_path / "m", device="numpy")


def test_unsupported_architecture_raises(checkpoints, tmp_path):
    path, _ = checkpoints["tied_kv1_odd"]
    shutil.copytree(path, tmp_path / "m")
    _edit_config(tmp_path / "m", model_type="llama")
    with pytest.raises(ValueError, match="model_type='llama'"):
        Qwen2.from_pretrained(tmp_path / "m", device="numpy")


def test_sliding_window_raises(checkpoints, tmp_path):
    path, _ = checkpoints["tied_kv1_odd"]
    shutil.copytree(path, tmp_path / "m")
    _edit_config(tmp_path / "m", use_sliding_window=True)
    with pytest.raises(ValueError, match="sliding-window"):
        Qwen2.from_pretrained(tmp_path / "m", device="numpy")


def test_unsupported_dtype_raises(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = checkpoints["tied_kv1_odd"]
    shutil.copytree(path, tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="'model.norm.weight'.*unsupported dtype I32"):
        Qwen2.from_pretrained(tmp_path / "m", device="numpy")


def test_token_id_outside_vocab_raises(checkpoints):
    path, _ = checkpoints["tied_kv1_odd"]
    model = Qwen2.from_pretrained(path, device="numpy")
    with pytest.raises(ValueError, match="token id 97 is outside the vocabulary"):
        model(np.array([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.generate(np.array([[-1, 3]]), max_new_tokens=2)


def test_unknown_device_raises(checkpoints):
    path, _ = checkpoints["tied_kv1_odd"]
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        Qwen2.from_pretrained(path, device="tpu")


# --------------------------------------------------------------------------------------------
# Chat example


def _add_tokenizer(path: Path, vocab_size: int) -> None:
    """Write a word-level tokenizer.json and a tokenizer_config.json with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|im_end|>", "<|im_start|>", "[UNK]", "system", "user", "assistant", "\n"] + [f"w{i}" for i in range(vocab_size - 7)]
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))


def test_chat_example_streams_a_reply(checkpoints, tmp_path):
    path, _ = checkpoints["tied_kv1_odd"]
    shutil.copytree(path, tmp_path / "m")
    _add_tokenizer(tmp_path / "m", 97)
    assert "im_start" in load_chat_template(tmp_path / "m")
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "qwen_chat.py"), "--model", str(tmp_path / "m"), "--device", "numpy",
         "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--temperature", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "generated" in result.stderr
    assert result.stdout.strip()


def test_chat_example_missing_model_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "qwen_chat.py"), "--model", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr


# --------------------------------------------------------------------------------------------
# Compiled path (MAX, CPU)


# The prefill and decode layer bodies take several minutes to compile cold on a 2-core CPU, which is
# past the budget of the default run. A warm MODGRAD_CACHE_DIR loads them in seconds.
@pytest.mark.max
@pytest.mark.slow
def test_compiled_cpu_matches_transformers(checkpoints):
    path, hf = checkpoints["tied_kv1_odd"]
    model = Qwen2.from_pretrained(path, device="cpu")
    for batch, length in ((2, 13), (1, 6)):  # one compilation serves both shapes
        ids = _prompt(model.config.vocab_size, batch=batch, length=length)
        _assert_logits_close(model(ids), _hf_logits(hf, ids))
    ids = _prompt(model.config.vocab_size, batch=2, length=5, seed=2)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=32), _hf_greedy(hf, ids, 32))
