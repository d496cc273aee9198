"""Train the byte-level hybrid LM sample (Mamba2 + attention + MLP blocks, Nemotron-H-like) on the King
James Bible (Debian bible-kjv). Seeded; CPU only.

    python samples/hybrid-byte-lm/train.py --threads 1

The hybrid twin of samples/mamba2-byte-lm: the same text, the same held-out slice and the same
calibration slice under data/ (samples/mamba2-byte-lm/train.py's `data_slices`, so the files are byte
for byte those of the Mamba1 and Mamba2 samples), about the same size. The blocks follow a Nemotron-H
pattern string (`M` Mamba2, `*` attention, `-` MLP), one MambaLMConfig.layers entry per character.

Training runs the library's MambaLM built from that config with one part swapped: the SSD scan of the
Mamba2 blocks is the Mamba2 sample's `ssd_scan_train` (hand-written backward), loaded from its
train.py by path and checked against the library's ssd_scan before training starts. Evaluation, the
saved model and everything downstream use the library's own code.
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from mq_deploy import fileio
from mq_deploy.config import MambaLMConfig
from mq_deploy.data.text import bigram_bits_per_byte, kjv_text
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.families.mamba2.config import Mamba2Config
from mq_deploy.families.mlp.config import MLPConfig
from mq_deploy.models.io import save_weights_into
from mq_deploy.models.mamba import MambaLM

HERE = os.path.dirname(os.path.abspath(__file__))
MAMBA2_TRAIN = os.path.join(HERE, "..", "mamba2-byte-lm", "train.py")
# default data of `mq-deploy eval` / calibration, relative to the model folder
EXTRA = {"eval_data": "data/eval.txt", "calib_data": "data/calib.txt"}


def mamba2_sample():
    """The Mamba2 sample's train.py as a module: its training SSD scan, data slices and held-out metric."""
    spec = importlib.util.spec_from_file_location("mamba2_sample_train", MAMBA2_TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hybrid_config(args) -> MambaLMConfig:
    """One block config per pattern character (identical characters share one config)."""
    kinds = {
        "M": Mamba2Config(d_model=args.d_model, d_state=args.d_state, head_dim=args.head_dim, n_groups=args.n_groups),
        "*": AttentionConfig(d_model=args.d_model, n_heads=args.attn_heads, n_kv_heads=args.kv_heads,
                             head_dim=args.d_model // args.attn_heads, rope_dim=args.d_model // args.attn_heads),
        "-": MLPConfig(d_model=args.d_model, d_ff=args.d_ff, act="relu2"),
    }
    bad = sorted(set(args.pattern) - set(kinds))
    if bad or not args.pattern:
        raise SystemExit(f"--pattern {args.pattern!r}: use M (Mamba2), * (attention) and - (MLP)")
    return MambaLMConfig(d_model=args.d_model, n_layer=len(args.pattern), vocab_size=256,
                         layers=[kinds[c] for c in args.pattern])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=None, help="training text (default: the KJV printed by `bible`)")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--steps", type=int, default=560)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pattern", default="M-M*-M-", help="M Mamba2, * attention, - MLP (Nemotron-H's letters)")
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--d-state", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=48)
    ap.add_argument("--n-groups", type=int, default=2)
    ap.add_argument("--attn-heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64, help="SSD chunk of the training scan")
    ap.add_argument("--time-steps", type=int, default=0, help="time this many steps, print, and stop (no files)")
    return ap


def main():
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    m2 = mamba2_sample()
    err = m2.check_training_scan()
    if err > 1e-10:
        raise SystemExit(f"the training scan disagrees with ssd_scan (max rel err {err:.2e})")

    cfg = hybrid_config(args)
    text = open(args.text, "rb").read() if args.text else kjv_text()
    train, heldout, calib = m2.data_slices(text, args.seed)
    if not args.time_steps:
        data_dir = os.path.join(args.out, "data")
        os.makedirs(data_dir, exist_ok=True)
        fileio.write_bytes(os.path.join(data_dir, "eval.txt"), heldout, overwrite=True, inout=True)
        fileio.write_bytes(os.path.join(data_dir, "calib.txt"), calib, overwrite=True, inout=True)
    bigram = bigram_bits_per_byte(train, heldout)
    print(f"train {len(train)} bytes, held-out {len(heldout)} bytes, bigram baseline {bigram:.4f} bits/byte")

    model = MambaLM(cfg)
    model.reset_parameters(seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters; pattern {args.pattern}")
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    tr = torch.from_numpy(np.frombuffer(train, dtype=np.uint8).astype(np.int64))
    ho = np.frombuffer(heldout, dtype=np.uint8)
    g = torch.Generator().manual_seed(args.seed)
    warmup, t0, loads = 100, time.time(), []
    steps = args.time_steps or args.steps
    with m2.training_scan(args.chunk):
        for step in range(steps):
            starts = torch.randint(0, len(tr) - args.seq_len - 1, (args.batch,), generator=g)
            xb = torch.stack([tr[s:s + args.seq_len + 1] for s in starts.tolist()])
            lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(xb[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), xb[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if args.time_steps:
                print(f"step {step + 1}: {time.time() - t0:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
                continue
            if (step + 1) % 25 == 0:
                tok_s = (step + 1) * args.batch * args.seq_len / (time.time() - t0)
                loads.append(os.getloadavg()[0])
                print(f"step {step + 1}/{args.steps} loss {loss.item() / math.log(2):.3f} bits lr {lr:.2e} "
                      f"{tok_s:.0f} tok/s load {loads[-1]:.2f}", flush=True)
            if (step + 1) % 100 == 0 or step + 1 == args.steps:
                save_weights_into(model, args.out, extra=EXTRA)
    if args.time_steps:
        return
    train_seconds = round(time.time() - t0)
    bpb = m2.heldout_bpb(model, ho)
    log = {"args": vars(args), "parameters": n_params, "heldout_bits_per_byte": bpb, "bigram_bits_per_byte": bigram,
           "train_seconds": train_seconds, "train_tokens": args.steps * args.batch * args.seq_len,
           "load_average_1min": {"min": min(loads, default=None), "mean": (round(sum(loads) / len(loads), 2)
                                                                            if loads else None),
                                 "max": max(loads, default=None)}}
    print(json.dumps(log, indent=2))
    fileio.write_text(os.path.join(args.out, "train_log.json"), json.dumps(log, indent=2) + "\n", overwrite=True,
                      inout=True)


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # as in the Mamba2 sample: keep glibc from handing the scan's large buffers back to the OS after
        # every layer; the variable must be set before the process starts, so re-exec once with it
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "268435456"})
    main()
