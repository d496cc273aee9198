"""Train the byte-level Mamba2 LM sample on the King James Bible (Debian bible-kjv). Seeded; CPU only.

    python samples/mamba2-byte-lm/train.py --threads 1

The Mamba2 twin of samples/mamba-byte-lm: the same text, the same held-out slice (the last 5%, cut at a
line) and the same calibration slice of the training text under data/ (the same definitions, so the
files are byte for byte those of the Mamba1 sample). Writes model.safetensors + config.json into the
output folder (every 100 steps), and train_log.json with held-out bits per byte and the bigram baseline.

Training runs the library's Mamba2Mixer with one part swapped: the SSD scan is `ssd_scan_train`, a
custom autograd Function with a hand-written backward (the library's chunked `ssd_scan` under autograd
spends most of its time in the einsum/exp/mask graph it records). It has ssd_scan's signature and is
checked against it (values and gradients, float64) before training starts; evaluation, the saved model
and everything downstream use the library's own scan.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import mq_deploy.families.mamba2.mixer as mamba2_mixer
from mq_deploy import fileio
from mq_deploy.config import MambaLMConfig
from mq_deploy.data.text import bigram_bits_per_byte, kjv_text, split_train_heldout, windows
from mq_deploy.families.mamba2.config import Mamba2Config
from mq_deploy.models.io import save_weights_into
from mq_deploy.models.mamba import MambaLM
from mq_deploy.ops.ssd import discretize, ssd_scan

HERE = os.path.dirname(os.path.abspath(__file__))
# default data of `mq-deploy eval` / calibration, relative to the model folder
EXTRA = {"eval_data": "data/eval.txt", "calib_data": "data/calib.txt"}


# ---- the training-time SSD scan -------------------------------------------------------------------
# Layout inside: heads split into (G groups, R heads per group), chunks c of Q steps:
#   x, y [b, G, R, c, Q, P]; dt, s [b, G, R, c, Q]; B, C [b, G, c, Q, N] (shared by the R heads of a group);
#   states [b, G, R, (c,) P, N].
# s_i = sum_{k<=i} dt_k A (cumulative log decay inside the chunk), xd_j = dt_j x_j, CB_ij = C_i . B_j:
#   y_i   = sum_{j<=i} exp(s_i - s_j) CB_ij xd_j  +  exp(s_i) h_c C_i        (h_c: state entering chunk c)
#   S_c   = sum_j exp(s_last - s_j) xd_j (outer) B_j ;  h_{c+1} = exp(s_last) h_c + S_c


def _to_chunks(t, nc, Q, G, heads):
    """[b, Lp, H(, P)] -> [b, G, R, c, Q(, P)] (heads) or [b, Lp, G, N] -> [b, G, c, Q, N] (groups)."""
    b = t.shape[0]
    if heads:
        t = t.reshape(b, nc, Q, G, -1, *t.shape[3:])
        return t.permute(0, 3, 4, 1, 2, *range(5, t.dim())).contiguous()
    return t.reshape(b, nc, Q, G, -1).permute(0, 3, 1, 2, 4).contiguous()


def _from_heads(t, L):
    """[b, G, R, c, Q(, P)] -> [b, L, H(, P)]."""
    b, G, R, nc, Q = t.shape[:5]
    t = t.permute(0, 3, 4, 1, 2, *range(5, t.dim()))
    return t.reshape(b, nc * Q, G * R, *t.shape[5:])[:, :L]


def _from_groups(t, L):
    """[b, G, c, Q, N] -> [b, L, G, N]."""
    b, G, nc, Q, N = t.shape
    return t.permute(0, 2, 3, 1, 4).reshape(b, nc * Q, G, N)[:, :L]


class _ChunkedSSD(torch.autograd.Function):
    """(x [b, L, H, P], dt [b, L, H] (discretized), A [H], B, C [b, L, G, N], chunk) -> (y without D·x,
    last state [b, H, P, N]); the initial state is zero."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, Q):
        ctx.set_materialize_grads(False)        # the last state is usually unused: no zeros for it
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        R = H // G
        pad = (-L) % Q
        if pad:      # padded steps have dt = 0: no decay, no input
            x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        nc = (L + pad) // Q
        xh, dth = _to_chunks(x, nc, Q, G, True), _to_chunks(dt, nc, Q, G, True)
        Bg, Cg = _to_chunks(B, nc, Q, G, False), _to_chunks(C, nc, Q, G, False)
        s = torch.cumsum(dth * A.view(1, G, R, 1, 1), dim=-1)                         # [b, G, R, c, Q]
        xd = xh * dth[..., None]
        CB = (Cg @ Bg.transpose(-1, -2))[:, :, None]                                  # [b, G, 1, c, Q, Q]
        causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
        Lmat = torch.exp((s[..., :, None] - s[..., None, :]).masked_fill(~causal, float("-inf")))
        y = (Lmat * CB) @ xd
        w = torch.exp(s[..., -1:] - s)                                                # to the chunk's end
        S = (xd * w[..., None]).transpose(-1, -2) @ Bg[:, :, None]                    # [b, G, R, c, P, N]
        decay = torch.exp(s[..., -1])                                                 # [b, G, R, c]
        h = x.new_zeros(b, G, R, P, N)
        starts = []
        for c in range(nc):
            starts.append(h)
            h = decay[..., c, None, None] * h + S[:, :, :, c]
        start = torch.stack(starts, dim=3)                                            # [b, G, R, c, P, N]
        es = torch.exp(s)
        y = y + es[..., None] * (Cg[:, :, None] @ start.transpose(-1, -2))
        ctx.save_for_backward(xh, dth, A, Bg, Cg, s, CB, Lmat, w, decay, start, es)
        ctx.dims = (L, Q)
        return _from_heads(y, L), h.reshape(b, H, P, N)

    @staticmethod
    def backward(ctx, dy, dlast):
        xh, dth, A, Bg, Cg, s, CB, Lmat, w, decay, start, es = ctx.saved_tensors
        L, Q = ctx.dims
        b, G, R, nc = xh.shape[:4]
        P, N = xh.shape[-1], Bg.shape[-1]
        pad = nc * Q - L
        if dy is None:
            dy = xh.new_zeros(b, L, G * R, xh.shape[-1])
        if pad:
            dy = F.pad(dy, (0, 0, 0, 0, 0, pad))
        dyh = _to_chunks(dy, nc, Q, G, True)
        xd = xh * dth[..., None]
        M = Lmat * CB
        # inside the chunks
        dxd = M.transpose(-1, -2) @ dyh
        dM = dyh @ xd.transpose(-1, -2)                                               # [b, G, R, c, Q, Q]
        dMM = dM * M                                                                  # d/d(s_i - s_j)
        ds = dMM.sum(-1) - dMM.sum(-2)
        dCB = (dM * Lmat).sum(2)                                                      # [b, G, c, Q, Q]
        dC = dCB @ Bg
        dB = dCB.transpose(-1, -2) @ Cg
        # the state entering each chunk
        dyes = dyh * es[..., None]
        ds = ds + (dyes * (Cg[:, :, None] @ start.transpose(-1, -2))).sum(-1)
        dC = dC + (dyes @ start).sum(2)
        dstart = dyes.transpose(-1, -2) @ Cg[:, :, None]                              # [b, G, R, c, P, N]
        # the recurrence across chunks, backwards
        g = (dlast.reshape(b, G, R, P, N) if dlast is not None else xh.new_zeros(b, G, R, P, N))
        dS = torch.empty_like(dstart)
        ddecay = torch.empty_like(decay)
        for c in reversed(range(nc)):
            dS[:, :, :, c] = g
            ddecay[..., c] = (g * start[:, :, :, c]).sum((-1, -2))
            g = dstart[:, :, :, c] + decay[..., c, None, None] * g
        # S_c = sum_j w_j xd_j (outer) B_j
        v = (dS @ Bg[:, :, None].transpose(-1, -2)).transpose(-1, -2)                 # [b, G, R, c, Q, P]
        dxd = dxd + w[..., None] * v
        dww = (xd * v).sum(-1) * w
        dB = dB + ((xd * w[..., None]) @ dS).sum(2)
        ds = ds - dww
        ds[..., -1] += dww.sum(-1) + ddecay * decay
        # s = cumsum(dt A), xd = dt x
        da = ds.sum(-1, keepdim=True) - ds.cumsum(-1) + ds                            # reverse cumsum
        dx = dxd * dth[..., None]
        ddt = (dxd * xh).sum(-1) + da * A.view(1, G, R, 1, 1)
        dA = (da * dth).sum((0, 3, 4)).reshape(G * R)
        return _from_heads(dx, L), _from_heads(ddt, L), dA, _from_groups(dB, L), _from_groups(dC, L), None


def ssd_scan_train(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, None),
                   initial_state=None, return_last_state=False, chunk_size=64):
    """mq_deploy.ops.ssd.ssd_scan with a hand-written backward (the same signature; an initial state goes
    to the library's scan, training never has one)."""
    if initial_state is not None:
        return ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, return_last_state,
                        chunk_size)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    dt = discretize(dt, None if dt_bias is None else dt_bias.to(dtype), dt_softplus, dt_limit)
    y, last = _ChunkedSSD.apply(x, dt, A, B, C, max(1, min(chunk_size, x.shape[1])))
    if D is not None:
        y = y + x * D.to(dtype)[:, None]
    return (y, last) if return_last_state else y


@contextlib.contextmanager
def training_scan(chunk_size):
    """Mamba2Mixer.forward calls the scan it imported; swap ours in for the duration (and put it back)."""
    if mamba2_mixer.ssd_scan is not ssd_scan:
        raise RuntimeError("mq_deploy.families.mamba2.mixer no longer calls ops.ssd.ssd_scan; update train.py")
    mamba2_mixer.ssd_scan = lambda *a, **k: ssd_scan_train(*a, **{**k, "chunk_size": chunk_size})
    try:
        yield
    finally:
        mamba2_mixer.ssd_scan = ssd_scan


def check_training_scan(seed=0):
    """ssd_scan_train against the library's ssd_scan under autograd, float64: y, the last state and the
    gradients of x, dt, A, B, C, D, dt_bias. Two cases: a length that is not a multiple of the chunk,
    groups shared by several heads and a loss on the last state too; then one group, whole chunks and
    the last state unused (its gradient never materialised). Returns the largest relative error."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b, L, H, P, G, N, Q, use_last in ((2, 37, 6, 5, 2, 4, 8, True), (3, 32, 4, 3, 1, 5, 16, False)):
        shapes = {"x": (b, L, H, P), "dt": (b, L, H), "A": (H,), "B": (b, L, G, N), "C": (b, L, G, N), "D": (H,),
                  "dt_bias": (H,)}
        base = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
        base["A"] = -torch.rand(H, generator=g, dtype=torch.float64) * 3 - 0.1
        wy = torch.randn(b, L, H, P, generator=g, dtype=torch.float64)
        wh = torch.randn(b, H, P, N, generator=g, dtype=torch.float64)
        results = []
        for fn in (ssd_scan, ssd_scan_train):
            ins = {k: v.clone().requires_grad_() for k, v in base.items()}
            y, last = fn(**ins, dt_limit=(0.001, 5.0), return_last_state=True, chunk_size=Q)
            loss = (y * wy).sum() + ((last * wh).sum() if use_last else 0.0)
            loss.backward()
            results.append([y, last] + [ins[k].grad for k in shapes])
        names = ["y", "last_state"] + [f"grad {k}" for k in shapes]
        for name, ref, got in zip(names, *results):
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            print(f"  training scan vs ssd_scan, float64, L {L} chunk {Q} groups {G}, {name}: max rel err {err:.2e}")
            worst = max(worst, err)
    return worst


# ---- data, evaluation, training ---------------------------------------------------------------------

def data_slices(text: bytes, seed: int):
    """(train, held-out, calibration slice): samples/mamba-byte-lm/train.py's definitions, unchanged, so
    both samples score and calibrate on the same bytes."""
    train, heldout = split_train_heldout(text)
    rng = np.random.default_rng(seed)
    start = train.find(b"\n", int(rng.integers(0, len(train) - 70_000))) + 1
    return train, heldout, train[start:train.find(b"\n", start + 64_000) + 1]


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
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-state", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=48)
    ap.add_argument("--n-groups", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64, help="SSD chunk of the training scan")
    ap.add_argument("--library-scan", action="store_true",
                    help="train through the library's ssd_scan under autograd (slower; for comparison)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not args.library_scan:
        err = check_training_scan()
        if err > 1e-10:
            raise SystemExit(f"the training scan disagrees with ssd_scan (max rel err {err:.2e})")

    text = open(args.text, "rb").read() if args.text else kjv_text()
    train, heldout, calib = data_slices(text, args.seed)
    data_dir = os.path.join(args.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    fileio.write_bytes(os.path.join(data_dir, "eval.txt"), heldout, overwrite=True, inout=True)
    fileio.write_bytes(os.path.join(data_dir, "calib.txt"), calib, overwrite=True, inout=True)
    bigram = bigram_bits_per_byte(train, heldout)
    print(f"train {len(train)} bytes, held-out {len(heldout)} bytes, bigram baseline {bigram:.4f} bits/byte")

    mixer = Mamba2Config(d_model=args.d_model, d_state=args.d_state, head_dim=args.head_dim, n_groups=args.n_groups)
    cfg = MambaLMConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=256, mixer=mixer)
    model = MambaLM(cfg)
    model.reset_parameters(seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters; {mixer.n_heads} heads of {mixer.head_dim}, {mixer.n_groups} groups")
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    tr = torch.from_numpy(np.frombuffer(train, dtype=np.uint8).astype(np.int64))
    ho = np.frombuffer(heldout, dtype=np.uint8)
    g = torch.Generator().manual_seed(args.seed)
    warmup, t0, loads = 100, time.time(), []
    scan = contextlib.nullcontext() if args.library_scan else training_scan(args.chunk)
    with scan:
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
                loads.append(os.getloadavg()[0])
                print(f"step {step + 1}/{args.steps} loss {loss.item() / math.log(2):.3f} bits lr {lr:.2e} "
                      f"{tok_s:.0f} tok/s load {loads[-1]:.2f}", flush=True)
            if (step + 1) % 100 == 0 or step + 1 == args.steps:
                save_weights_into(model, args.out, extra=EXTRA)
    train_seconds = round(time.time() - t0)
    bpb = heldout_bpb(model, ho)
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
        # keep glibc from handing the scan's large buffers back to the OS after every layer (page-fault
        # storm); the variable must be set before the process starts, so re-exec once with it
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "268435456"})
    main()
