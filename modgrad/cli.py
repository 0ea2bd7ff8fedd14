"""The ``isis`` command line: train a byte-level brain, sample from it, chat with it, list devices.

    isis train OUT.safetensors --data corpus.txt --steps 500
    isis generate OUT.safetensors "ROMEO:" --max-tokens 200
    isis nc OUT.safetensors
    isis devices

Invalid input (a missing, empty or binary data file, a corrupt checkpoint, a token id outside
the vocabulary, a negative temperature, an unknown preset) prints one message on stderr and
exits with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(ValueError):
    """Invalid command-line input that is reported on stderr with exit status 2."""


def _user_errors() -> tuple[type[Exception], ...]:
    from modgrad.checkpoint import CheckpointError
    from modgrad.data import CorpusError
    from modgrad.train import TrainError

    return UsageError, CorpusError, CheckpointError, TrainError


# --------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    from modgrad.engine.compile import DEVICES
    from modgrad.losses import LOSSES
    from modgrad.train import PRESET_NAMES

    parser = argparse.ArgumentParser(
        prog="isis",
        description="Train and run Continuous Thought Machine brains on bytes of text. "
        "Tokens are bytes (ids 0-255); losses are cross-entropies in nats per byte.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a brain on a text file",
        description="Train a brain as a next-byte model on a UTF-8 text file. The last 10% of the file is "
        "held out; at the end the held-out loss and an add-one bigram baseline are printed in nats/byte. "
        "For OUT=run.safetensors it writes run.safetensors (weights), run.json (config and training state), "
        "run.opt.safetensors (optimizer state) and run.loss.png (loss curve).",
    )
    train.add_argument("out", metavar="OUT.safetensors", help="checkpoint path to write")
    train.add_argument("--data", default=None, metavar="FILE",
                       help="UTF-8 text file to train on (default: the bundled tinyshakespeare corpus)")
    # Defaults are None so that --resume can tell which settings were given explicitly.
    train.add_argument("--preset", choices=PRESET_NAMES, default=None, metavar="NAME",
                       help=f"brain architecture: {', '.join(PRESET_NAMES)} (default eight_region_small)")
    train.add_argument("--steps", type=int, default=None, help="total optimizer updates (default 200)")
    train.add_argument("--batch", type=int, default=None, help="windows per update (default 8)")
    train.add_argument("--seq-len", type=int, default=None, dest="seq_len",
                       help="bytes predicted per window; the brain's state is carried and backpropagated "
                       "through all of them (default 32)")
    train.add_argument("--lr", type=float, default=None,
                       help="peak AdamW learning rate, after a 20-step linear warmup, cosine-decayed to 10%% (default 3e-3)")
    train.add_argument("--ticks", type=int, default=None,
                       help="outer ticks per byte, and region ticks per outer tick (default 2)")
    train.add_argument("--embed", type=int, default=None, dest="embed_dim",
                       help="byte embedding width, the brain's observation size (default 32)")
    train.add_argument("--loss", choices=LOSSES, default=None,
                       help="per-tick loss: last (last tick's cross-entropy), ctm (min-loss + most-certain tick), "
                       "imagination or thinking (default last)")
    train.add_argument("--device", choices=DEVICES, default=None,
                       help="cpu (compiled with MAX), gpu (MAX accelerator) or numpy (eager, no compile) (default cpu)")
    train.add_argument("--seed", type=int, default=None, help="seed of the initial weights and the batch sampler (default 0)")
    train.add_argument("--eval-every", type=int, default=None, dest="eval_every",
                       help="updates between held-out evaluations, 0 = only at the end (default 50)")
    train.add_argument("--save-every", type=int, default=None, dest="save_every",
                       help="updates between checkpoints, 0 = only at the end (default 100)")
    train.add_argument("--eval-windows", type=int, default=None, dest="eval_windows",
                       help="held-out windows of --seq-len bytes scored per evaluation (default 64)")
    train.add_argument("--resume", action="store_true", help="continue the run saved at OUT up to --steps")
    train.add_argument("--overwrite", action="store_true", help="start a new run even if OUT exists")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--sample", type=int, default=200, metavar="N",
                       help="bytes to generate from the prompt 'ROMEO:' after training, 0 = none (default 200)")

    generate = sub.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Feed PROMPT byte by byte, then sample and print --max-tokens bytes.",
    )
    generate.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by isis train")
    generate.add_argument("prompt", nargs="?", default="the ", metavar="PROMPT", help="text to continue (default 'the ')")
    generate.add_argument("--tokens", default=None, metavar="IDS",
                          help="comma-separated token ids to feed instead of PROMPT, e.g. 72,105")
    generate.add_argument("-m", "--max-tokens", type=int, default=200, help="tokens (bytes) to sample (default 200)")
    generate.add_argument("-t", "--temperature", type=float, default=0.8,
                          help="softmax temperature, 0 = always the most likely byte (default 0.8)")
    generate.add_argument("--seed", type=int, default=None, help="sampler seed (default: from the clock)")
    generate.add_argument("--device", choices=("numpy", "cpu"), default="numpy",
                          help="numpy runs each step eagerly; cpu compiles the step with MAX first (default numpy)")

    nc = sub.add_parser(
        "nc",
        help="chat with a checkpoint interactively",
        description="Interactive neural computer: each line is fed as bytes (with its newline) and a reply is sampled; "
        "the brain's state persists across turns. Commands: /reset (start state), /save PATH "
        "(weights + state), /quit.",
    )
    nc.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by isis train or /save")
    nc.add_argument("-m", "--max-tokens", type=int, default=256, help="max tokens (bytes) per reply (default 256)")
    nc.add_argument("-t", "--temperature", type=float, default=0.8,
                    help="softmax temperature, 0 = always the most likely byte (default 0.8)")
    nc.add_argument("--seed", type=int, default=None, help="sampler seed (default: from the clock)")
    nc.add_argument("--device", choices=("numpy", "cpu"), default="numpy",
                    help="numpy runs each step eagerly; cpu compiles the step with MAX first (default numpy)")

    sub.add_parser("devices", help="list the devices MAX can run on", description="List the compute devices.")
    return parser


# --------------------------------------------------------------------------------------------
# train


TRAIN_SETTINGS = ("preset", "steps", "batch", "seq_len", "lr", "ticks", "embed_dim", "loss", "device", "seed",
                  "eval_every", "save_every", "eval_windows")


def cmd_train(args) -> int:
    from modgrad.checkpoint import checkpoint_paths
    from modgrad.train import TrainConfig, Trainer

    given = {name: getattr(args, name) for name in TRAIN_SETTINGS if getattr(args, name) is not None}
    out = Path(args.out)
    exists = any(p.exists() for name, p in checkpoint_paths(out).items() if name != "plot")
    if args.resume:
        data = {"data": args.data} if args.data is not None else {}  # default: the corpus stored in the checkpoint
        trainer = Trainer.resume(out, progress=not args.no_progress, **data, **given)
    else:
        if exists and not args.overwrite:
            raise UsageError(f"{out} (or its .json/.opt.safetensors) already exists; pass --resume to continue it "
                             f"or --overwrite to start a new run")
        trainer = Trainer(TrainConfig(data=args.data or _default_corpus(), **given), out, progress=not args.no_progress)

    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        print(f"isis: interrupted at step {trainer.step}; checkpoint saved to {out}. "
              f"Continue with: isis train {out} --resume", file=sys.stderr)
        return 130
    held, bigram = summary["held_out"], summary["bigram"]
    print(f"steps: {summary['steps']}")
    print(f"held-out loss: {held:.4f} nats/byte ({held / math.log(2):.4f} bits/byte)")
    print(f"bigram baseline: {bigram:.4f} nats/byte ({bigram / math.log(2):.4f} bits/byte)")
    print(f"throughput: {summary['tokens_per_second']:.0f} bytes/s over {summary['train_seconds']:.1f} s")
    print(f"checkpoint: {out}")
    if args.sample > 0:
        from modgrad.graph import NeuralComputer

        computer = NeuralComputer(trainer.params, trainer.buffers, trainer.brain, seed=0)
        prompt = list(b"ROMEO:")
        sampled = computer.generate(prompt, args.sample, 0.8)
        print("sample (temperature 0.8):")
        print(bytes(t for t in prompt + sampled if t < 256).decode("utf-8", errors="replace"))
    return 0


# --------------------------------------------------------------------------------------------
# generate and nc


def _check_temperature(value: float) -> None:
    if not value >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {value}")


def _check_max_tokens(value: int) -> None:
    if value < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {value}")


def ncstate_path(path: str | Path) -> Path:
    """Return the path of the neural computer state saved beside the checkpoint ``path``."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix == ".safetensors" else path
    return base.with_name(base.name + ".ncstate.safetensors")


def _open_computer(args):
    from modgrad.graph import NeuralComputer
    from modgrad.checkpoint import load_brain

    params, buffers, brain, _ = load_brain(args.checkpoint)
    return NeuralComputer(params, buffers, brain, seed=args.seed, device=args.device)


def _parse_token_ids(text: str, vocab: int) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UsageError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("--tokens is empty; pass at least one token id")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(f"token id {bad[0]} is out of the vocabulary of this checkpoint (ids 0..{vocab - 1})")
    return ids


def cmd_generate(args) -> int:
    _check_temperature(args.temperature)
    _check_max_tokens(args.max_tokens)
    computer = _open_computer(args)
    vocab = computer.cfg.out_dims
    if args.tokens is not None:
        prompt = _parse_token_ids(args.tokens, vocab)
    else:
        prompt = list(args.prompt.encode("utf-8"))
        if not prompt:
            raise UsageError("the prompt is empty; pass some text or --tokens")
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise UsageError(f"prompt byte {bad[0]} is out of the vocabulary of this checkpoint (ids 0..{vocab - 1})")

    sampled = computer.generate(prompt, args.max_tokens, args.temperature)
    text = bytes(t for t in prompt + sampled if t < 256).decode("utf-8", errors="replace")
    sys.stdout.write(text + "\n")
    return 0


def _save_computer(computer, path: Path, loaded_from: Path) -> None:
    from modgrad.checkpoint import Checkpoint, checkpoint_paths, save_checkpoint

    if path.resolve() == loaded_from.resolve():
        raise UsageError(f"/save would overwrite the loaded checkpoint {path}; choose another path")
    ckpt = Checkpoint(
        config={"brain": computer.cfg.to_dict(), "vocab": computer.cfg.out_dims},
        params=computer.params,
        buffers=computer.buffers,
    )
    save_checkpoint(path, ckpt)
    computer.save(ncstate_path(path))
    print(f"saved weights to {path} and state to {ncstate_path(path)} ({checkpoint_paths(path)['config'].name} beside)")


def cmd_nc(args) -> int:
    _check_temperature(args.temperature)
    _check_max_tokens(args.max_tokens)
    computer = _open_computer(args)
    state_file = ncstate_path(args.checkpoint)
    if state_file.exists():
        try:
            computer.load(state_file)
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"cannot restore the saved state {state_file}: {err}") from None
        print(f"restored state from {state_file} ({len(computer.history)} tokens of history)")
    print("type text to chat; /reset, /save PATH, /quit")

    for line in sys.stdin:
        line = line.rstrip("\n")
        command = line.strip()
        if command in ("/quit", "/exit", "/q"):
            break
        if command == "/reset":
            computer.reset()
            print("state reset")
            continue
        if command.startswith("/save"):
            target = command[len("/save"):].strip()
            if not target:
                print("usage: /save PATH", file=sys.stderr)
                continue
            try:
                _save_computer(computer, Path(target), Path(args.checkpoint))
            except (UsageError, OSError) as err:
                print(f"isis: error: {err}", file=sys.stderr)
            continue
        if not line:
            continue
        reply = computer.chat(line + "\n", args.max_tokens, args.temperature)
        print(reply, flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# devices


def cmd_devices(args) -> int:
    import modgrad as mg

    print(f"cpu threads: {os.cpu_count()}")
    for device in mg.devices():
        note = {"cpu": "MAX on the host CPU", "gpu": "MAX accelerator", "numpy": "eager numpy reference"}[device]
        print(f"{device}: {note}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "nc": cmd_nc, "devices": cmd_devices}


def _default_corpus() -> str:
    from modgrad.corpus import TINYSHAKESPEARE

    return str(TINYSHAKESPEARE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as err:
        print(f"isis: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("isis: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
