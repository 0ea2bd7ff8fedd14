"""Checkpoints: weights as safetensors, a JSON config beside them, and the optimizer state.

A checkpoint saved as ``run.safetensors`` is three files:

    run.safetensors       parameters ("params/<path>") and buffers ("buffers/<path>")
    run.json              model config, training state (step, sampler RNG, loss history), save id
    run.opt.safetensors   optimizer state ("<path>" of its tree), only when one is saved

Each file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written file under the final name. The JSON file is renamed last and every
file carries the same random save id, so a set of files from different saves (a crash between
two renames) is detected on load instead of being silently mixed.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from modgrad.engine.pytree import tree_flatten, tree_map, tree_unflatten
from modgrad.files import atomic_write
from modgrad.graph import ParamSpec, RegionalConfig, param_shapes

FORMAT = "modgrad-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, or inconsistent with its config."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint: trees of numpy arrays plus the JSON-ready config and training state."""

    config: dict
    params: dict
    buffers: dict
    trainer: dict = field(default_factory=dict)
    opt_state: dict | None = None


def checkpoint_paths(path: str | Path) -> dict[str, Path]:
    """Return the paths of the files that make up the checkpoint saved as ``path``."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix == ".safetensors" else path
    return {
        "weights": path,
        "config": base.with_name(base.name + ".json"),
        "optimizer": base.with_name(base.name + ".opt.safetensors"),
        "plot": base.with_name(base.name + ".loss.png"),
    }


# --------------------------------------------------------------------------------------------
# Trees <-> flat name dictionaries


def tree_paths(tree) -> list[str]:
    """Return one "/"-joined key path per leaf, in ``tree_flatten`` order (sorted dict keys, list order)."""
    paths: list[str] = []

    def walk(node, prefix: str) -> None:
        if node is None:
            return
        if isinstance(node, dict):
            for key in sorted(node):
                walk(node[key], f"{prefix}{key}/")
        elif isinstance(node, (list, tuple)):
            for i, child in enumerate(node):
                walk(child, f"{prefix}{i}/")
        else:
            paths.append(prefix[:-1])

    walk(tree, "")
    return paths


def flatten_tree(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """{prefix + path: contiguous numpy array} for every leaf of ``tree``."""
    leaves = tree_flatten(tree)[0]
    # np.require keeps 0-d arrays 0-d, unlike np.ascontiguousarray.
    return {prefix + p: np.require(np.asarray(x), requirements="C") for p, x in zip(tree_paths(tree), leaves)}


def unflatten_tree(flat: dict[str, np.ndarray]):
    """Rebuild nested dicts and lists from "/"-joined paths; all-digit keys become list positions."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        keys = path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return _lists_from_digit_keys(root)


def _lists_from_digit_keys(node):
    if not isinstance(node, dict):
        return node
    children = {k: _lists_from_digit_keys(v) for k, v in node.items()}
    if children and all(k.isdigit() for k in children):
        indices = sorted(int(k) for k in children)
        if indices == list(range(len(indices))):
            return [children[str(i)] for i in indices]
    return children


def restructure(tree, template):
    """Rearrange the leaves of ``tree`` into the structure of ``template``, matching them by path.

    Empty lists and dicts do not survive a round trip through flat names, so a loaded tree is
    rebuilt on the structure the model expects. Call ``check_shapes`` first.
    """
    flat = flatten_tree(tree)
    leaves, treedef = tree_flatten(template)
    return tree_unflatten(treedef, [flat[path] for path in tree_paths(template)])


def check_shapes(tree, expected: dict[str, tuple], what: str) -> None:
    """Raise CheckpointError unless ``tree`` has exactly the leaves and shapes of ``expected``."""
    got = {p: tuple(np.shape(x)) for p, x in flatten_tree(tree).items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            f"the weights file and its .json config come from different models"
        )
    wrong = [(p, got[p], tuple(expected[p])) for p in sorted(expected) if got[p] != tuple(expected[p])]
    if wrong:
        p, g, e = wrong[0]
        raise CheckpointError(
            f"{what} do not match the config: {p!r} has shape {g}, the config needs {e} "
            f"({len(wrong)} mismatched tensor(s)); the weights file and its .json config come from different models"
        )


# --------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> dict[str, Path]:
    """Write ``ckpt`` as the files of ``checkpoint_paths(path)``; return those paths."""
    paths = checkpoint_paths(path)
    save_id = secrets.token_hex(8)
    meta = {"format": FORMAT, "version": str(VERSION), "save_id": save_id}

    if ckpt.opt_state is not None:
        opt_flat = flatten_tree(ckpt.opt_state)
        atomic_write(paths["optimizer"], lambda tmp: save_file(opt_flat, tmp, metadata=meta))

    weights = {**flatten_tree(ckpt.params, "params/"), **flatten_tree(ckpt.buffers, "buffers/")}
    atomic_write(paths["weights"], lambda tmp: save_file(weights, tmp, metadata=meta))

    document = {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "has_optimizer": ckpt.opt_state is not None,
        "config": ckpt.config,
        "trainer": ckpt.trainer,
    }
    text = json.dumps(document, indent=1)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(paths["config"], write_json)
    return paths


# --------------------------------------------------------------------------------------------
# Loading


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict]:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({err}); save it again") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a modgrad checkpoint (no '{FORMAT}' metadata)")
    return tensors, metadata


def read_config(path: str | Path) -> dict:
    """Read and validate the JSON document of the checkpoint saved as ``path``."""
    paths = checkpoint_paths(path)
    if not paths["weights"].is_file():
        raise CheckpointError(f"checkpoint not found: {paths['weights']}")
    config_path = paths["config"]
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint config not found: {config_path} (it is written beside the weights)")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint config {config_path} is corrupt or truncated ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a modgrad checkpoint config (missing format '{FORMAT}')")
    if document.get("version") != VERSION:
        raise CheckpointError(f"{config_path} has checkpoint version {document.get('version')}; this modgrad reads {VERSION}")
    for key in ("save_id", "config"):
        if key not in document:
            raise CheckpointError(f"checkpoint config {config_path} has no {key!r} entry")
    return document


def load_checkpoint(path: str | Path, with_optimizer: bool = False) -> Checkpoint:
    """Load the checkpoint saved as ``path``; the optimizer state too when ``with_optimizer``.

    Raises CheckpointError for missing, corrupt or truncated files and for files of different saves.
    The caller checks shapes against the model config with ``check_shapes`` or ``restore_weights``.
    """
    paths = checkpoint_paths(path)
    document = read_config(path)
    tensors, metadata = _read_safetensors(paths["weights"], "checkpoint weights")
    if metadata.get("save_id") != document["save_id"]:
        raise CheckpointError(
            f"{paths['weights']} and {paths['config']} come from different saves "
            f"(an interrupted save or a copied file); use a matching pair"
        )
    params = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    buffers = {k[len("buffers/"):]: v for k, v in tensors.items() if k.startswith("buffers/")}
    if not params:
        raise CheckpointError(f"{paths['weights']} contains no parameters; it is not a model checkpoint")

    opt_state = None
    if with_optimizer:
        if not document.get("has_optimizer"):
            raise CheckpointError(f"checkpoint {paths['weights']} was saved without optimizer state; it cannot be resumed")
        opt_flat, opt_meta = _read_safetensors(paths["optimizer"], "optimizer state")
        if opt_meta.get("save_id") != document["save_id"]:
            raise CheckpointError(
                f"{paths['optimizer']} and {paths['config']} come from different saves; use a matching set"
            )
        opt_state = unflatten_tree(opt_flat)

    return Checkpoint(
        config=document["config"],
        params=unflatten_tree(params),
        buffers=unflatten_tree(buffers),
        trainer=document.get("trainer") or {},
        opt_state=opt_state,
    )


# --------------------------------------------------------------------------------------------
# Brain checkpoints: the config is stored as {"brain": RegionalConfig.to_dict(), ...}


def spec_shapes(specs) -> dict[str, tuple]:
    """Return {path: shape} for a tree with ParamSpec leaves."""
    return {path: spec.shape for path, spec in zip(tree_paths(specs), tree_flatten(specs)[0])}


def buffer_specs(cfg: RegionalConfig) -> dict:
    """Return the buffers tree of a brain built from ``cfg`` (its sync pair indices) with ParamSpec leaves."""
    regions = [
        {
            "left_out": ParamSpec((r.n_synch_out,), "int64"),
            "right_out": ParamSpec((r.n_synch_out,), "int64"),
            "left_action": ParamSpec((r.n_synch_action,), "int64"),
            "right_action": ParamSpec((r.n_synch_action,), "int64"),
        }
        for r in cfg.regions
    ]
    gs = ParamSpec((cfg.n_global_sync,), "int64")
    return {"regions": regions, "global_left": gs, "global_right": gs}


def check_buffers(buffers: dict, cfg: RegionalConfig) -> None:
    """Raise CheckpointError unless the sync pair indices have the config's shapes and index real neurons."""
    check_shapes(buffers, spec_shapes(buffer_specs(cfg)), "checkpoint buffers")
    limits = {"global_left": cfg.total_d, "global_right": cfg.total_d}
    for r, region in enumerate(cfg.regions):
        for name in ("left_out", "right_out", "left_action", "right_action"):
            limits[f"regions/{r}/{name}"] = region.d_model
    flat = flatten_tree(buffers)
    for path, limit in limits.items():
        idx = flat[path]
        if not np.issubdtype(idx.dtype, np.integer) or (idx.size and (idx.min() < 0 or idx.max() >= limit)):
            raise CheckpointError(f"checkpoint buffer {path!r} contains invalid neuron indices (expected integers in 0..{limit - 1})")


def restore_weights(ckpt: Checkpoint, cfg: RegionalConfig) -> tuple[dict, dict]:
    """Check a loaded checkpoint's params and buffers against ``cfg``; return them in the model's tree layout."""
    specs = param_shapes(cfg)
    check_shapes(ckpt.params, spec_shapes(specs), "checkpoint weights")
    check_buffers(ckpt.buffers, cfg)
    params = tree_map(lambda x: np.asarray(x, np.float32), restructure(ckpt.params, specs))
    buffers = tree_map(lambda x: np.asarray(x, np.int64), restructure(ckpt.buffers, buffer_specs(cfg)))
    return params, buffers


def restore_opt_state(state: dict, cfg: RegionalConfig) -> dict:
    """Check a loaded AdamW state ({"step", "m", "v"}) against ``cfg``; return it in the optimizer's layout."""
    specs = param_shapes(cfg)
    template = {"step": ParamSpec((), "int32"), "m": specs, "v": specs}
    check_shapes(state, spec_shapes(template), "checkpoint optimizer state")
    state = restructure(state, template)
    moments = {k: tree_map(lambda x: np.asarray(x, np.float32), state[k]) for k in ("m", "v")}
    return {"step": np.asarray(state["step"], np.int32), **moments}


def load_brain(path: str | Path) -> tuple[dict, dict, RegionalConfig, dict]:
    """Load (params, buffers, config, trainer state) from a checkpoint, checking weights against the config."""
    ckpt = load_checkpoint(path)
    try:
        brain = RegionalConfig.from_dict(ckpt.config["brain"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint config of {path} does not describe a brain ({err})") from None
    params, buffers = restore_weights(ckpt, brain)
    return params, buffers, brain, ckpt.trainer
