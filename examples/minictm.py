"""minictm: train a small CTM brain on a text file, then chat with it. The whole loop in one file.

    python examples/minictm.py --data ../shared/data/tinyshakespeare.txt --steps 300 --chat
    python examples/minictm.py -c minictm.safetensors --chat      # chat with a saved brain

The brain reads one byte at a time and carries its state (neuron traces, synchronisation) from
byte to byte. Training backpropagates through a whole window of bytes, every outer tick and every
region tick. The checkpoint is the one `isis generate` and `isis nc` read.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np

import modgrad as mg
from modgrad import ops
from modgrad.checkpoint import Checkpoint, load_brain, save_checkpoint
from modgrad.ctm import count_params
from modgrad.data import Corpus, WindowSampler, bigram_baseline, held_out_windows
from modgrad.graph import NeuralComputer, brain_forward_tokens, init_brain
from modgrad.losses import LastTickCE, cross_entropy
from modgrad.optim import AdamW, clip_by_global_norm, linear_warmup_cosine
from modgrad.train import PRESET_NAMES, build_brain

parser = argparse.ArgumentParser(description="Train a small CTM brain on bytes of text and chat with it.")
parser.add_argument("--data", help="UTF-8 text file to train on (the last 10%% is held out)")
parser.add_argument("--steps", type=int, default=300, help="optimizer updates")
parser.add_argument("--preset", default="eight_region_small", choices=PRESET_NAMES, help="brain architecture")
parser.add_argument("--ticks", type=int, default=1, help="outer ticks per byte (and region ticks per outer tick)")
parser.add_argument("--embed", type=int, default=32, help="byte embedding width")
parser.add_argument("--batch", type=int, default=16, help="windows per update")
parser.add_argument("--seq-len", type=int, default=32, help="bytes per window")
parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
parser.add_argument("--device", default="numpy", choices=("numpy", "cpu", "gpu"), help="numpy needs no compile")
parser.add_argument("-c", "--checkpoint", default="minictm.safetensors", help="where to save (or load) the brain")
parser.add_argument("--chat", action="store_true", help="chat after training (or with the loaded checkpoint)")
args = parser.parse_args()

# ---- model -----------------------------------------------------------------------------------
if args.data:
    corpus = Corpus.load(args.data, args.seq_len)
    cfg = build_brain(args.preset, args.embed, args.ticks)
    params, buffers = init_brain(cfg, seed=0)
elif Path(args.checkpoint).exists():
    params, buffers, cfg, _ = load_brain(args.checkpoint)
else:
    parser.error(f"pass --data to train, or -c CHECKPOINT of a trained brain ({args.checkpoint} does not exist)")
print(f"{cfg.name}: {count_params(params):,} parameters")


def window_loss(params, buffers, tokens):
    """Mean next-byte cross-entropy of the last outer tick over a window batch (B, L+1)."""
    logits, _ = brain_forward_tokens(params, buffers, cfg, tokens[:, :-1])  # (B, L, K, 256)
    b, l, k, v = ops.shape_of(logits)
    return LastTickCE()(ops.reshape(logits, (b * l, k, v)), ops.reshape(tokens[:, 1:], (b * l,)))


opt = AdamW(lr=args.lr, weight_decay=0.01)


def train_step(params, opt_state, buffers, tokens, lr):
    loss, grads = mg.value_and_grad(window_loss)(params, buffers, tokens)
    grads, _ = clip_by_global_norm(grads, 1.0)
    params, opt_state = opt.update(params, grads, opt_state, lr=lr)
    return loss, params, opt_state


def held_out_loss(params, buffers, tokens):
    logits, _ = brain_forward_tokens(params, buffers, cfg, tokens[:, :-1])
    return ops.mean(cross_entropy(logits[:, :, -1], tokens[:, 1:]))


# ---- training --------------------------------------------------------------------------------
if args.data:
    step_fn = mg.compile(train_step, device=args.device)  # traced once; the lr is an input
    eval_fn = mg.compile(held_out_loss, device=args.device)
    opt_state = opt.init(params)
    sampler = WindowSampler(corpus.train, args.batch, args.seq_len, seed=0)
    val = held_out_windows(corpus.held_out, args.seq_len, args.batch)
    val = np.concatenate([val, np.repeat(val[:1], args.batch - len(val), 0)])  # pad to the batch size
    start = time.time()
    for step in range(args.steps):
        lr = np.float32(linear_warmup_cosine(step, args.lr, min(20, args.steps), args.steps, min_lr=args.lr / 10))
        loss, params, opt_state = step_fn(params, opt_state, buffers, sampler.sample(), lr)
        if step % 25 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch * args.seq_len / (time.time() - start)
            print(f"step {step:5d}  loss {float(loss):.3f}  lr {lr:.2e}  {rate:.0f} bytes/s")
    held = float(eval_fn(params, buffers, val))
    bigram = bigram_baseline(corpus.train, corpus.held_out)
    print(f"held-out {held:.3f} nats/byte ({held / math.log(2):.3f} bits), bigram baseline {bigram:.3f}")
    save_checkpoint(args.checkpoint, Checkpoint(config={"brain": cfg.to_dict(), "vocab": 256}, params=params, buffers=buffers))
    print(f"saved {args.checkpoint}")

# ---- sampling and chat -----------------------------------------------------------------------
computer = NeuralComputer(params, buffers, cfg, seed=0)
for prompt in ("the ", "ROMEO:\n"):
    computer.reset()
    print(repr(prompt + computer.chat(prompt, max_tokens=60, temperature=0.7)))

if args.chat:
    computer.reset()
    print("chat with the brain (its state carries over between lines); Ctrl-D to quit")
    try:
        while True:
            print(computer.chat(input("> ") + "\n", max_tokens=100, temperature=0.7))
    except EOFError:
        pass
