"""The native int8 CPU scan (libmq_scan_cpu.so) against the PyTorch paths, tokens per second.

    python bench/scan_cpu.py [--threads N] [--repeats 5] [--json OUT]

Variants, on the same inputs (int8 codes + scales; the float paths get the dequantized tensors, the
dequantization not timed), checked against each other before timing:
  native      mq_deploy.ops.native.selective_scan_int8_native (C++, std::thread, output fp32)
  fast-fp32   mq_deploy.ops.selective_scan.selective_scan (our fast PyTorch time-step loop)
  int8-ref    mq_deploy.ops.selective_scan.selective_scan_int8_ref (the contract: per-step loop)
tokens/s = batch * L / the best of --repeats runs (the least disturbed by other load on a shared
machine). torch uses the same thread count as the native library.
"""

import argparse
import time

import torch
from benchmeta import RunMeta, write

from mq_deploy.ops import native
from mq_deploy.ops.selective_scan import selective_scan, selective_scan_int8_ref

SHAPES = [(1, 1024, 768, 16), (1, 1024, 1536, 16), (4, 512, 1536, 16), (1, 1, 1536, 16)]


def inputs(b, L, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def q(*s):
        return torch.randint(-127, 128, s, dtype=torch.int8, generator=g)

    return dict(qx=q(b, L, d), x_scale=0.02, qdelta=q(b, L, d), delta_scale=0.015,
                A=-torch.rand(d, n, generator=g) * 2 - 0.05, qB=q(b, L, n), B_scale=0.03, qC=q(b, L, n),
                C_scale=0.025, D=torch.randn(d, generator=g), qz=q(b, L, d), z_scale=0.03,
                delta_bias=torch.randn(d, generator=g) * 0.5 - 1.0)


def timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="OUT", help="write the figures and the run's load here")
    a = ap.parse_args()
    meta = RunMeta()
    if not native.available():
        raise SystemExit(native.unavailable_reason())
    torch.set_num_threads(a.threads)
    print(f"threads={a.threads}; tokens/s = batch*L / best of {a.repeats} runs")
    print(f"{'b':>2} {'L':>5} {'D':>5} {'N':>3} | {'native':>10} {'fast-fp32':>10} {'int8-ref':>10} | "
          f"{'native/fast':>11} {'native/ref':>10} | rel err vs ref")
    rows = []
    with torch.no_grad():
        for b, L, d, n in SHAPES:
            kw = inputs(b, L, d, n)
            fl = dict(x=kw["qx"].float() * kw["x_scale"], delta=kw["qdelta"].float() * kw["delta_scale"], A=kw["A"],
                      B=kw["qB"].float() * kw["B_scale"], C=kw["qC"].float() * kw["C_scale"], D=kw["D"],
                      z=kw["qz"].float() * kw["z_scale"], delta_bias=kw["delta_bias"], delta_softplus=True)
            want = selective_scan_int8_ref(**kw)
            got = native.selective_scan_int8_native(**kw, num_threads=a.threads)
            err = ((got - want).abs().max() / want.abs().max()).item()
            t_nat = timed(lambda: native.selective_scan_int8_native(**kw, num_threads=a.threads), a.repeats)
            t_fast = timed(lambda: selective_scan(**fl), a.repeats)
            t_ref = timed(lambda: selective_scan_int8_ref(**kw), max(1, a.repeats // 2))
            tps = [b * L / t for t in (t_nat, t_fast, t_ref)]
            print(f"{b:>2} {L:>5} {d:>5} {n:>3} | {tps[0]:>10.0f} {tps[1]:>10.0f} {tps[2]:>10.0f} | "
                  f"{t_fast / t_nat:>10.1f}x {t_ref / t_nat:>9.1f}x | {err:.1e}", flush=True)
            rows.append({"b": b, "L": L, "D": d, "N": n,
                         "tokens_per_s": {"native": tps[0], "fast_fp32": tps[1], "int8_ref": tps[2]},
                         "native_vs_fast": t_fast / t_nat, "native_vs_ref": t_ref / t_nat, "rel_err": err})
    if a.json:
        write(a.json, {"threads": a.threads, "repeats": a.repeats, "rows": rows}, meta)


if __name__ == "__main__":
    main()
