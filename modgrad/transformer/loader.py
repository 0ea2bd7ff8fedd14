"""Load a Hugging Face Qwen2 directory: config.json, (sharded) safetensors weights, tokenizer files.

Weights are read from the safetensors files directly (an 8-byte little-endian header length, a
JSON header of name -> {dtype, shape, data_offsets}, then raw row-major bytes), so bf16 needs
neither torch nor a numpy bf16 type. F32, F64, F16 and BF16 tensors are widened or narrowed to
float32; other dtypes are rejected.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

from modgrad.transformer.config import Qwen2Config

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_NUMPY_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def _require_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist or is not a directory")
    return path


def read_config(path: str | Path) -> Qwen2Config:
    """Parse ``config.json`` in the model directory ``path``."""
    file = _require_dir(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"missing config.json in {str(file.parent)!r}; a Hugging Face model directory needs it")
    with open(file) as f:
        return Qwen2Config.from_hf(json.load(f))


# --------------------------------------------------------------------------------------------
# safetensors


class SafetensorsFile:
    """Header of one safetensors file; ``read(name)`` returns a tensor as float32."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{str(path)!r} is not a safetensors file: shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{str(path)!r} has an unreadable safetensors header: {err}") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: dict[str, dict[str, Any]] = header

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = entry["dtype"]
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(
                f"tensor {name!r} in {self.path.name} has unsupported dtype {dtype}; "
                f"supported: {', '.join(_NUMPY_DTYPES)}"
            )
        shape = tuple(entry["shape"])
        start, end = entry["data_offsets"]
        stored = _NUMPY_DTYPES[dtype]
        if end - start != int(np.prod(shape, dtype=np.int64)) * stored.itemsize:
            raise ValueError(f"tensor {name!r} in {self.path.name}: byte range {start}:{end} does not match shape {shape} {dtype}")
        raw = np.fromfile(self.path, dtype=stored, count=(end - start) // stored.itemsize, offset=self.data_start + start)
        if dtype == "BF16":
            # bfloat16 is the top half of a float32.
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32, copy=False).reshape(shape)


def open_checkpoint(path: Path) -> dict[str, SafetensorsFile]:
    """Map every tensor name to the file that contains it, following ``model.safetensors.index.json`` if present."""
    index = path / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"shard {shard!r} listed in {INDEX_FILE} is missing from {str(path)!r}")
            files[shard] = SafetensorsFile(shard_path)
        by_name = {}
        for name, shard in weight_map.items():
            if name not in files[shard].entries:
                raise ValueError(f"{INDEX_FILE} places tensor {name!r} in {shard!r}, but that shard does not contain it")
            by_name[name] = files[shard]
        return by_name
    single = path / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(path)!r}")
    file = SafetensorsFile(single)
    return {name: file for name in file.entries}


def _check_dtypes(tensors: dict[str, SafetensorsFile]) -> None:
    for name, file in tensors.items():
        dtype = file.entries[name]["dtype"]
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(
                f"tensor {name!r} in {file.path.name} has unsupported dtype {dtype}; supported: {', '.join(_NUMPY_DTYPES)}"
            )
    found = sorted({file.entries[name]["dtype"] for name, file in tensors.items()})
    if found != ["F32"]:
        log.info("converting checkpoint dtype(s) %s to float32", ", ".join(found))


def expected_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and their [out, in] shapes."""
    d, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (i, d),
            p + "mlp.up_proj.weight": (i, d),
            p + "mlp.down_proj.weight": (d, i),
        })
    return shapes


def load_state_dict(path: str | Path, cfg: Qwen2Config) -> dict[str, np.ndarray]:
    """Read every tensor ``cfg`` needs as float32, checking names and shapes."""
    tensors = open_checkpoint(_require_dir(path))
    shapes = expected_shapes(cfg)
    missing = [name for name in shapes if name not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint in {str(path)!r} lacks tensor(s) {', '.join(missing[:3])}{more}")
    needed = {name: tensors[name] for name in shapes}
    _check_dtypes(needed)
    for name, shape in shapes.items():
        found = tuple(needed[name].entries[name]["shape"])
        if found != shape:
            raise ValueError(f"tensor {name!r} has shape {list(found)}, but config.json implies {list(shape)}")
    return {name: file.read(name) for name, file in needed.items()}


def params_from_state_dict(state: dict[str, np.ndarray], cfg: Qwen2Config) -> dict:
    """Rearrange checkpoint tensors into the model's (in, out) layout: fused q/k/v and gate/up, stacked over layers."""

    def t(name: str) -> np.ndarray:
        return np.ascontiguousarray(state[name].T)

    layers = []
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        attn, mlp = p + "self_attn.", p + "mlp."
        layers.append({
            "ln1": state[p + "input_layernorm.weight"],
            "qkv_w": np.concatenate([t(attn + "q_proj.weight"), t(attn + "k_proj.weight"), t(attn + "v_proj.weight")], axis=1),
            "qkv_b": np.concatenate([state[attn + "q_proj.bias"], state[attn + "k_proj.bias"], state[attn + "v_proj.bias"]]),
            "o_w": t(attn + "o_proj.weight"),
            "ln2": state[p + "post_attention_layernorm.weight"],
            "gate_up_w": np.concatenate([t(mlp + "gate_proj.weight"), t(mlp + "up_proj.weight")], axis=1),
            "down_w": t(mlp + "down_proj.weight"),
        })
    stacked = {key: np.stack([layer[key] for layer in layers]) for key in layers[0]}  # (n_layers, ...)
    params = {"layers": stacked, "norm": state["model.norm.weight"]}
    if cfg.tie_word_embeddings:
        params["lm_head"] = t("model.embed_tokens.weight")  # (D, V), also read as the input embedding
    else:
        params["embed"] = state["model.embed_tokens.weight"]  # (V, D)
        params["lm_head"] = t("lm_head.weight")  # (D, V)
    return params


def load_qwen2(path: str | Path) -> tuple[Qwen2Config, dict]:
    """Return the config and float32 parameter tree of the Qwen2 model in directory ``path``."""
    cfg = read_config(path)
    state = load_state_dict(path, cfg)
    return cfg, params_from_state_dict(state, cfg)


# --------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path: str | Path):
    """Return the ``tokenizers.Tokenizer`` stored in ``tokenizer.json`` of the model directory."""
    from tokenizers import Tokenizer

    file = _require_dir(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"missing tokenizer.json in {str(file.parent)!r}")
    return Tokenizer.from_file(str(file))


def load_tokenizer_config(path: str | Path) -> dict[str, Any]:
    """Return ``tokenizer_config.json`` as a dict, or {} when the directory has none."""
    file = _require_dir(path) / "tokenizer_config.json"
    if not file.is_file():
        return {}
    with open(file) as f:
        return json.load(f)


def load_chat_template(path: str | Path) -> str | None:
    """Return the Jinja chat template of the model directory, or None when it has none.

    Newer transformers versions save it as ``chat_template.jinja``; older ones (and the Qwen2.5
    releases) keep it under ``chat_template`` in ``tokenizer_config.json``.
    """
    file = _require_dir(path) / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    template = load_tokenizer_config(path).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template
