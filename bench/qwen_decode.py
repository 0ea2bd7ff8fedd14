"""Greedy decode speed of a random-weight Qwen2.5-0.5B: modgrad (compiled and numpy) vs transformers eager.

All implementations run the same random float32 weights (transformers' init, copied into
modgrad's layout) with Qwen2.5-0.5B shapes: hidden 896, 14 heads, 2 kv heads, intermediate 4864,
vocab 151936, tied embeddings, 24 layers unless --layers sets fewer. Implementations:
modgrad-cpu (compiled MAX graphs), modgrad-numpy (the same math run eagerly) and
transformers-eager (torch, CPU). One JSON line per measurement:

  machine        CPU, cores, versions
  bandwidth      measured memcpy traffic (read + write bytes per second) and the decode bound it
                 implies: batch x bandwidth / weight bytes per step, since every decode step reads
                 every weight once
  compile        first_call_s: tracing and compiling modgrad's two programs, or loading them
                 from the disk cache
  decode         per implementation and batch: tokens_per_s counts the new tokens of all rows
                 per second of decode, prefill excluded; also ms_per_step and prefill_ms
  agreement      fraction of greedy tokens on which a modgrad implementation and transformers
                 agree (random weights have near-ties, so a few late differences are possible)

    python bench/qwen_decode.py
    python bench/qwen_decode.py --layers 4 --batch 1 8 --new-tokens 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import add_repo_to_path, emit, machine_info

add_repo_to_path()

from modgrad.transformer import Qwen2, Qwen2Config  # noqa: E402
from modgrad.transformer.loader import params_from_state_dict  # noqa: E402


IMPLS = ("modgrad-cpu", "modgrad-numpy", "transformers-eager")


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Best memcpy traffic in bytes per second (each copied byte is read once and written once)."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def build_transformers(cfg: Qwen2Config, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
    )
    return transformers.Qwen2ForCausalLM(hf_cfg).eval()


def decode_modgrad(model: Qwen2, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float, float]:
    """Greedy tokens (B, n), prefill seconds and decode seconds."""
    start = time.perf_counter()
    logits, cache = model.prefill(ids, capacity=ids.shape[1] + new_tokens)
    prefill = time.perf_counter() - start
    tokens = [logits.argmax(-1)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        tokens.append(model.decode(tokens[-1], cache).argmax(-1))
    return np.stack(tokens, 1), prefill, time.perf_counter() - start


def decode_transformers(model, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float, float]:
    import inspect

    import torch

    # transformers 5.25 deprecates the forward argument past_key_values in favour of cache.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        start = time.perf_counter()
        out = model(torch.from_numpy(ids), use_cache=True)
        prefill = time.perf_counter() - start
        tokens = [out.logits[:, -1].argmax(-1)]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tokens[-1][:, None], use_cache=True, **{cache_arg: out.past_key_values})
            tokens.append(out.logits[:, -1].argmax(-1))
        elapsed = time.perf_counter() - start
    return torch.stack(tokens, 1).numpy(), prefill, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B has 24)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per row")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                        help="implementations to measure")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the first token comes from the prefill)")

    cfg = Qwen2Config(num_hidden_layers=args.layers)
    emit({"bench": "machine", **machine_info()})
    weight_bytes = 4 * cfg.num_params()
    bandwidth = copy_bandwidth()
    emit({"bench": "bandwidth", "copy_traffic_GBps": round(bandwidth / 1e9, 2), "layers": args.layers,
          "weight_bytes_per_step": weight_bytes,
          "bound_tokens_per_s": {str(b): round(b * bandwidth / weight_bytes, 2) for b in args.batch}})

    start = time.perf_counter()
    hf = build_transformers(cfg, args.seed)
    state = {name: t.detach().numpy() for name, t in hf.state_dict().items()}
    params = params_from_state_dict(state, cfg)
    del state
    models = {"modgrad-cpu": Qwen2(cfg, params, device="cpu"), "modgrad-numpy": Qwen2(cfg, params, device="numpy")}
    build_s = time.perf_counter() - start

    rng = np.random.default_rng(args.seed)
    common = {"layers": args.layers, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    steps = args.new_tokens - 1
    for batch in args.batch:
        ids = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len), dtype=np.int64)
        tokens = {}
        for impl in args.impls:
            if impl == "transformers-eager":
                decode_transformers(hf, ids, 2)  # warm-up
                tokens[impl], prefill, elapsed = decode_transformers(hf, ids, args.new_tokens)
            else:
                start = time.perf_counter()
                decode_modgrad(models[impl], ids, 2)  # warm-up; compiles or loads the programs on the first call
                if impl == "modgrad-cpu" and batch == args.batch[0]:
                    emit({"bench": "compile", "impl": impl, "first_call_s": round(time.perf_counter() - start, 1),
                          "build_weights_s": round(build_s, 1), **common})
                tokens[impl], prefill, elapsed = decode_modgrad(models[impl], ids, args.new_tokens)
            emit({"bench": "decode", "impl": impl, "batch": batch, **common,
                  "tokens_per_s": round(batch * steps / elapsed, 2), "ms_per_step": round(1e3 * elapsed / steps, 1),
                  "prefill_ms": round(1e3 * prefill, 1)})
        for impl in tokens:
            if impl != "transformers-eager" and "transformers-eager" in tokens:
                same = tokens[impl] == tokens["transformers-eager"]
                emit({"bench": "agreement", "impl": impl, "batch": batch, "same_tokens": round(float(same.mean()), 3),
                      "same_first_token": round(float(same[:, 0].mean()), 3)})

if __name__ == "__main__":
    main()
