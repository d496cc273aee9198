"""Train the Vim sample on Fashion-MNIST (Debian package dataset-fashion-mnist). Seeded; CPU only.

    python samples/vim-fashion-mnist/train.py            # ~10 min per epoch on 2 cores

Writes model.safetensors + config.json into this folder after every epoch (atomically) and
train_log.json with the per-epoch test top-1 at the end.
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

from mq_deploy.config import VimConfig
from mq_deploy.data.images import DEBIAN_FASHION_MNIST, load_idx_split, to_tensor, write_idx
from mq_deploy.models.io import save_weights_into
from mq_deploy.models.vim import Vim

HERE = os.path.dirname(os.path.abspath(__file__))
# default data of `mq-deploy eval` / calibration, relative to the model folder
EXTRA = {"eval_data": "data", "calib_data": "data"}
MEAN, STD = (0.2860,), (0.3530,)


@torch.no_grad()
def evaluate(model, x, y, batch=500):
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def write_sample_data(data_dir, xtr, ytr, xte, yte, seed, n_calib=1024):
    """The full test split (for eval) and a seeded slice of the training split (for calibration)."""
    os.makedirs(data_dir, exist_ok=True)
    write_idx(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"), xte)
    write_idx(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"), yte)
    pick = np.sort(np.random.default_rng(seed).permutation(len(xtr))[:n_calib])
    write_idx(os.path.join(data_dir, "calib-images-idx3-ubyte.gz"), xtr[pick])
    write_idx(os.path.join(data_dir, "calib-labels-idx1-ubyte.gz"), ytr[pick])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DEBIAN_FASHION_MNIST)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    xtr, ytr = load_idx_split(args.data, "train")
    xte, yte = load_idx_split(args.data, "test")
    write_sample_data(os.path.join(args.out, "data"), xtr, ytr, xte, yte, args.seed)
    xtr, xte = to_tensor(xtr, MEAN, STD), to_tensor(xte, MEAN, STD)
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)

    cfg = VimConfig(d_model=192, n_layer=4, num_classes=10, img_size=28, patch_size=7, in_chans=1,
                    image_mean=MEAN, image_std=STD)
    model = Vim(cfg)
    model.reset_parameters(seed=args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    steps_per_epoch = len(xtr) // args.batch
    total, warmup = steps_per_epoch * args.epochs, 300
    g = torch.Generator().manual_seed(args.seed)
    log, step, t0 = [], 0, time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            xb, yb = xtr[idx], ytr[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{total} loss {loss.item():.4f} lr {lr:.2e} "
                      f"{step * args.batch / (time.time() - t0):.0f} img/s", flush=True)
        acc = evaluate(model, xte, yte)
        log.append({"epoch": epoch + 1, "test_top1": acc, "elapsed_s": round(time.time() - t0)})
        print(f"epoch {epoch + 1}: test top-1 {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
        save_weights_into(model, args.out, extra=EXTRA)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({"args": vars(args), "epochs": log}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # keep glibc from handing the scan's large buffers back to the OS after every layer (page-fault
        # storm); the variable must be set before the process starts, so re-exec once with it
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "268435456"})
    main()
