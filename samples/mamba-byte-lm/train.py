"""Train the byte-level Mamba LM sample on the King James Bible (Debian bible-kjv). Seeded; CPU only.

    python samples/mamba-byte-lm/train.py

The last 5% of the text (cut at a line) is held out. Writes model.safetensors + config.json into the
output folder (atomically, every 100 steps), the held-out slice and a calibration slice of the
training text under data/, and train_log.json with held-out bits per byte and the bigram baseline.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from mq_deploy.config import MambaLMConfig
from mq_deploy.data.text import bigram_bits_per_byte, kjv_text, split_train_heldout, windows
from mq_deploy.models.io import save_weights_into
from mq_deploy.models.mamba import MambaLM

HERE = os.path.dirname(os.path.abspath(__file__))
# default data of `mq-deploy eval` / calibration, relative to the model folder
EXTRA = {"eval_data": "data/eval.txt", "calib_data": "data/calib.txt"}


@torch.no_grad()
def heldout_bpb(model, tokens, seq_len=1024, batch=8):
    model.eval()
    w = torch.from_numpy(windows(tokens, seq_len).astype(np.int64))
    nats = 0.0
    for i in range(0, len(w), batch):
        xb = w[i:i + batch]
        logits = model(xb[:, :-1])
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="sum").item()
    model.train()
    return nats / (w.shape[0] * seq_len) / math.log(2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=None, help="training text (default: the KJV printed by `bible`)")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--n-layer", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = open(args.text, "rb").read() if args.text else kjv_text()
    train, heldout = split_train_heldout(text)
    data_dir = os.path.join(args.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "eval.txt"), "wb") as f:
        f.write(heldout)
    rng = np.random.default_rng(args.seed)
    start = train.find(b"\n", int(rng.integers(0, len(train) - 70_000))) + 1
    with open(os.path.join(data_dir, "calib.txt"), "wb") as f:
        f.write(train[start:train.find(b"\n", start + 64_000) + 1])
    bigram = bigram_bits_per_byte(train, heldout)
    print(f"train {len(train)} bytes, held-out {len(heldout)} bytes, bigram baseline {bigram:.4f} bits/byte")

    cfg = MambaLMConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=256)
    model = MambaLM(cfg)
    model.reset_parameters(seed=args.seed)
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    tr = torch.from_numpy(np.frombuffer(train, dtype=np.uint8).astype(np.int64))
    ho = np.frombuffer(heldout, dtype=np.uint8)
    g = torch.Generator().manual_seed(args.seed)
    warmup, t0, log = 100, time.time(), []
    for step in range(args.steps):
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
        if (step + 1) % 25 == 0:
            tok_s = (step + 1) * args.batch * args.seq_len / (time.time() - t0)
            print(f"step {step + 1}/{args.steps} loss {loss.item() / math.log(2):.3f} bits lr {lr:.2e} {tok_s:.0f} tok/s",
                  flush=True)
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            save_weights_into(model, args.out, extra=EXTRA)
    bpb = heldout_bpb(model, ho)
    log = {"args": vars(args), "heldout_bits_per_byte": bpb, "bigram_bits_per_byte": bigram,
           "train_seconds": round(time.time() - t0), "train_tokens": args.steps * args.batch * args.seq_len}
    print(json.dumps(log, indent=2))
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # keep glibc from handing the scan's large buffers back to the OS after every layer (page-fault
        # storm); the variable must be set before the process starts, so re-exec once with it
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "268435456"})
    main()
