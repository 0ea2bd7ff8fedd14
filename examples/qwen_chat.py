"""qwen_chat: chat with a local Qwen2 / Qwen2.5 model directory, streaming the reply.

    python examples/qwen_chat.py --model path/to/Qwen2.5-0.5B-Instruct
    python examples/qwen_chat.py --model DIR --prompt "Once upon a time" --max-new-tokens 64 --temperature 0

DIR is a Hugging Face model directory (config.json, model.safetensors or a sharded index,
tokenizer.json). With a chat template (tokenizer_config.json or chat_template.jinja) each turn
is wrapped as a chat message; without one the prompt is continued as plain text. Nothing is
downloaded. Without --prompt the script reads turns from standard input until EOF or "/exit".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from modgrad.transformer import Qwen2
from modgrad.transformer.loader import load_chat_template, load_tokenizer, load_tokenizer_config


def render_chat(template: str, messages: list[dict], special: dict) -> str:
    """Render a Hugging Face Jinja chat template the way transformers does (sandboxed, trimmed blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


def stop_ids(model_dir: Path, tokenizer, tokenizer_config: dict) -> list[int]:
    """EOS ids from generation_config.json and tokenizer_config.json, plus Qwen's end-of-turn tokens."""
    ids: set[int] = set()
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    eos_token = tokenizer_config.get("eos_token")
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    for token in (eos_token, "<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.token_to_id(token) if token else None
        if token_id is not None:
            ids.add(token_id)
    return sorted(ids)


def reply(model: Qwen2, tokenizer, prompt_ids: list[int], args, stops: list[int]) -> str:
    """Generate and print one reply token by token; return its text."""
    new_ids: list[int] = []
    printed_text = ""
    start = time.perf_counter()
    stream = model.stream(np.array([prompt_ids]), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, eos_token_id=stops or None, seed=args.seed)
    for next_ids in stream:
        token = int(next_ids[0])
        if token in stops:
            break
        new_ids.append(token)
        # Decode the whole reply each time so multi-byte characters split across tokens print correctly.
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(printed_text):], end="", flush=True)
            printed_text = text
    elapsed = time.perf_counter() - start
    print(flush=True)
    rate = len(new_ids) / elapsed if elapsed > 0 else 0.0
    print(f"generated {len(new_ids)} tokens in {elapsed * 1e3:.0f} ms ({rate:.1f} tok/s)", file=sys.stderr)
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face Qwen2 model directory")
    parser.add_argument("--prompt", help="one prompt to answer, then exit (default: read turns from stdin)")
    parser.add_argument("--system", default=None, help="system message prepended to the chat")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 decodes greedily")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", default="cpu", choices=["cpu", "numpy"],
                        help="cpu: compiled MAX graphs; numpy: eager reference (slow, no compile)")
    args = parser.parse_args()

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        print(f"error: model directory {str(model_dir)!r} does not exist; pass a local Hugging Face Qwen2 "
              "directory with --model", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(model_dir)
        tokenizer_config = load_tokenizer_config(model_dir)
        template = load_chat_template(model_dir)
        start = time.perf_counter()
        model = Qwen2.from_pretrained(model_dir, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"loaded {model_dir} ({model.config.num_params() / 1e6:.1f}M parameters, device {args.device}) "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    stops = stop_ids(model_dir, tokenizer, tokenizer_config)
    special = {k: v for k, v in tokenizer_config.items() if k.endswith("_token") and isinstance(v, str)}

    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return 0
            user = turns.pop(0)
        else:
            try:
                user = input("> ")
            except EOFError:
                return 0
            if user.strip() == "/exit":
                return 0
        messages.append({"role": "user", "content": user})
        text = render_chat(template, messages, special) if template else user
        prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
        if not prompt_ids:
            print("error: the prompt encodes to no tokens", file=sys.stderr)
            messages.pop()
            continue
        answer = reply(model, tokenizer, prompt_ids, args, stops)
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    sys.exit(main())
