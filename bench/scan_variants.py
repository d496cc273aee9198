"""Why the fast CPU scan is a time-step loop: it against vectorised alternatives, side by side.

    python bench/scan_variants.py [--threads 2] [--json OUT]

Variants, all on the same inputs, checked against selective_scan_ref before timing:
  step-loop      mq_deploy.ops.selective_scan (time-major [L, b, N, Di], one fused update a step)
  chunked-par    vectorised over time inside chunks of T steps: h_t = sum_{s<=t} exp(cs_t - cs_s) b_s
                 with cs the in-chunk cumulative log decay (stable: every exponent is <= 0), state
                 carried between chunks; T*T more work, no Python loop inside a chunk
  log-scan       Hillis-Steele doubling scan over the whole sequence: log2(L) full-tensor passes
  reference      selective_scan_ref (per-step loop in [b, Di, N] layout)
Shapes: the two samples' inference shapes and the 130m-size decode-prefill shape.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from benchmeta import RunMeta, write

from mq_deploy.ops.selective_scan import selective_scan, selective_scan_ref


def chunked_parallel(x, delta, A, B, C, D, z, delta_bias, T=16):
    dt = F.softplus(delta + delta_bias).transpose(0, 1)             # [L, b, Di]
    xt, Bt, Ct = x.transpose(0, 1), B.transpose(0, 1), C.transpose(0, 1)
    L, b, d = xt.shape
    n = A.shape[1]
    AT = A.t()
    h = x.new_zeros(b, n, d)
    ys = []
    for s in range(0, L, T):
        e = min(L, s + T)
        u = dt[s:e].unsqueeze(-2) * AT                             # [t, b, N, Di] log decay
        cs = torch.cumsum(u, 0)
        drive = (dt[s:e] * xt[s:e]).unsqueeze(-2) * Bt[s:e].unsqueeze(-1)
        t = e - s
        diff = cs.unsqueeze(1) - cs.unsqueeze(0)                   # [t, s, ...] = cs_t - cs_s
        mask = torch.ones(t, t, dtype=torch.bool).tril().view(t, t, 1, 1, 1)
        w = torch.where(mask, diff, torch.full_like(diff, -math.inf)).exp_()
        H = (w * drive.unsqueeze(0)).sum(1) + cs.exp() * h
        ys.append(torch.matmul(Ct[s:e].unsqueeze(-2), H).squeeze(-2))
        h = H[-1]
    y = torch.cat(ys, 0).transpose(0, 1)
    return (y + x * D) * F.silu(z)


def log_scan(x, delta, A, B, C, D, z, delta_bias):
    dt = F.softplus(delta + delta_bias).transpose(0, 1)
    xt, Bt, Ct = x.transpose(0, 1), B.transpose(0, 1), C.transpose(0, 1)
    a = torch.exp(dt.unsqueeze(-2) * A.t())                        # [L, b, N, Di]
    h = (dt * xt).unsqueeze(-2) * Bt.unsqueeze(-1)
    step = 1
    while step < a.shape[0]:                                       # (a, h) o (a', h') = (a a', a' h + h')
        h = torch.cat([h[:step], h[step:] + a[step:] * h[:-step]], 0)
        a = torch.cat([a[:step], a[step:] * a[:-step]], 0)
        step *= 2
    y = torch.matmul(Ct.unsqueeze(-2), h).squeeze(-2).transpose(0, 1)
    return (y + x * D) * F.silu(z)


def inputs(b, L, d, n):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(b, L, d), r(b, L, d) * 0.5, -torch.rand(d, n, generator=g) * 3 - 0.1, r(b, L, n), r(b, L, n),
            r(d), r(b, L, d), r(d) * 0.3)


def timeit(fn, args, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", metavar="OUT", help="write the figures and the run's load here")
    args = ap.parse_args()
    meta = RunMeta()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {"step-loop": selective_scan, "chunked-par": chunked_parallel, "log-scan": log_scan,
                "reference": selective_scan_ref}
    shapes = [("vim sample, batch 256", (256, 17, 384, 16)), ("byte LM sample, 8x1024", (8, 1024, 384, 16)),
              ("130m layer, 1x256", (1, 256, 1536, 16))]
    print(f"torch threads {torch.get_num_threads()}; time per call (ms), median of {args.repeats}; "
          "ratio = variant / step-loop")
    rows = []
    with torch.inference_mode():
        for name, shape in shapes:
            a = inputs(*shape)
            want = selective_scan_ref(*a)
            row = {}
            for vname, fn in variants.items():
                err = ((fn(*a) - want).abs().max() / want.abs().max()).item()
                row[vname] = (timeit(fn, a, args.repeats), err)
            base = row["step-loop"][0]
            print(f"{name:26s} " + "  ".join(f"{k} {t * 1e3:8.1f} ({t / base:5.1f}x, err {e:.0e})"
                                              for k, (t, e) in row.items()), flush=True)
            rows.append({"shape": name, "b_l_d_n": list(shape),
                         "ms": {k: t * 1e3 for k, (t, _) in row.items()},
                         "vs_step_loop": {k: t / base for k, (t, _) in row.items()},
                         "rel_err": {k: e for k, (_, e) in row.items()}})
    if args.json:
        write(args.json, {"threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}, meta)


if __name__ == "__main__":
    main()
