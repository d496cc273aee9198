"""The native Mamba2 scan at a mamba2-130m layer (d_model 768: 24 heads of 64 channels, d_state 128, 1 group).

    python bench/ssd_bench.py [--threads 2] [--repeats 7] [--json OUT]          # CPU: ONNX Runtime
    python bench/ssd_bench.py --gpu [--iters 50] [--json OUT]                    # GPU: libmq_scan_cuda.so

CPU: each model (one mq:: node, every input a graph input) runs in two ONNX Runtime sessions with the same options
and inputs: without the library (ORT inlines the model-local function body: the chunked matmul form for
mq::SSDScan; the conv, SiLU, quant points and that scan for mq::SSDStateUpdate) and with libmq_scan_ort.so's
kernel. Their outputs are compared first (rel err = max |diff| / max |body|). Time: the best of --repeats runs
after one warm-up (the least disturbed by other load on a shared machine); the run's load is recorded.
Rows: prefill L = 256 (mq::SSDScan int8 and mq::SSDScanFloat), one decode step (mq::SSDStateUpdate, the step
graph's op: conv over x|B|C and the scan from the states; and mq::SSDScan alone at L = 1).

GPU (--gpu): the CUDA kernels through ctypes on torch CUDA tensors, timed with CUDA events (mean of --iters calls
after a warm-up): the chunked prefill (b 1 and 4, L 256 / 1024 / 4096, with and without the L-split), the decode
step kernel (b 1, 8, 64), and L decode steps in a row against one prefill of L tokens (what a chunked prefill
buys over looping the step kernel, TensorRT Edge-LLM's approach). Parity with ssd_scan_int8_ref on a small shape
is printed first.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
from benchmeta import RunMeta, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

H, P, G, N, K = 24, 64, 1, 128, 4     # mamba2-130m: d_inner 1536 = 24 x 64, conv over 1536 + 2 x 128 channels
SCALES = dict(x=0.02, dt=0.015, B=0.03, C=0.025)
ROWS: list = []


# ---- CPU: ONNX Runtime ----------------------------------------------------------------------------------------

def cpu_feeds(b, L, quant, seed=0):
    rng = np.random.default_rng(seed)
    f = dict(x=rng.integers(-128, 128, (b, L, H * P)), dt=rng.integers(-128, 128, (b, L, H)),
             A=-np.exp(rng.uniform(-1.5, 1.5, H)), B=rng.integers(-128, 128, (b, L, G * N)),
             C=rng.integers(-128, 128, (b, L, G * N)), D=rng.standard_normal(H), dt_bias=rng.uniform(-4, -1, H),
             h0=rng.standard_normal((b, H, P, N)))
    out = {}
    for k, v in f.items():
        if k in SCALES:
            out[k] = v.astype(np.int8) if quant else (v * SCALES[k]).astype(np.float32)
        else:
            out[k] = v.astype(np.float32)
    return out


def update_feeds(b, L, quant, seed=0):
    rng = np.random.default_rng(seed)
    Cd = H * P + 2 * G * N
    dt = rng.integers(-128, 128, (b, L, H))
    return dict(xbc=rng.standard_normal((b, L, Cd)).astype(np.float32),
                dt=dt.astype(np.int8) if quant else (dt * SCALES["dt"]).astype(np.float32),
                conv_state=(rng.standard_normal((1, b, Cd, K - 1)) * 0.5).astype(np.float32),
                ssm_state=rng.standard_normal((1, b, H, P, N)).astype(np.float32),
                conv_w=(rng.standard_normal((Cd, K)) * 0.5).astype(np.float32),
                conv_b=(rng.standard_normal(Cd) * 0.1).astype(np.float32),
                A=(-np.exp(rng.uniform(-1.5, 1.5, H))).astype(np.float32), D=rng.standard_normal(H).astype(np.float32),
                dt_bias=rng.uniform(-4, -1, H).astype(np.float32))


def ort_session(model, lib, threads):
    import onnxruntime as ort

    from mq_deploy.backends.ort.runner import exact_int8

    so = exact_int8(ort.SessionOptions())
    so.intra_op_num_threads = threads
    if lib:
        so.register_custom_ops_library(lib)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def best_time(sess, feed, repeats):
    out = sess.run(None, feed)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def compare(name, model, feed, lib, threads, repeats):
    t_body, out_body = best_time(ort_session(model, None, threads), feed, repeats)
    t_lib, out_lib = best_time(ort_session(model, lib, threads), feed, repeats)
    errs = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in zip(out_lib, out_body)]
    print(f"{name:<52} | {t_body * 1e3:>9.2f} {t_lib * 1e3:>9.3f} | {t_body / t_lib:>7.1f}x | {max(errs):.1e}",
          flush=True)
    ROWS.append({"model": name, "body_ms": t_body * 1e3, "lib_ms": t_lib * 1e3, "speedup": t_body / t_lib,
                 "rel_err": max(errs), "load_1min": os.getloadavg()[0]})


def run_cpu(a):
    import onnxruntime as ort
    from test_native_ssd import scan_model, update_model

    from mq_deploy.ops.native import ort_library_path

    lib = a.lib or ort_library_path()
    if not os.path.isfile(lib):
        raise SystemExit(f"{lib} is not built: python -m mq_deploy.ops.native --build (or pip install -e .)")
    print(f"onnxruntime {ort.__version__}, CPU EP, intra_op_num_threads={a.threads}, best of {a.repeats} runs; "
          f"lib {lib}; load average before {os.getloadavg()}")
    print(f"{'model (mamba2-130m layer: H 24, P 64, G 1, N 128)':<52} | {'body ms':>9} {'lib ms':>9} | "
          f"{'speedup':>8} | rel err")
    attrs = dict(heads=H, head_dim=P, groups=G, d_state=N, chunk=256, dt_min=0.0, dt_max=math.inf)
    scan8 = scan_model(H, P, G, N, chunk=256, scales=SCALES)
    scanf = scan_model(H, P, G, N, chunk=256)
    for b, L in ((1, 256), (4, 256)):
        compare(f"mq::SSDScan int8 prefill b{b} L{L}", scan8, cpu_feeds(b, L, True), lib, a.threads, a.repeats)
        compare(f"mq::SSDScanFloat prefill b{b} L{L}", scanf, cpu_feeds(b, L, False), lib, a.threads, a.repeats)
    for b in (1, 8):
        upd = update_model(H, P, G, N, K, 1, 0, True, dict(attrs, conv_scale=0.05,
                                                         **{f"{k}_scale": [v] for k, v in SCALES.items()}))
        compare(f"mq::SSDStateUpdate int8 decode step b{b}", upd, update_feeds(b, 1, True), lib, a.threads, a.repeats)
        updf = update_model(H, P, G, N, K, 1, 0, False, attrs)
        compare(f"mq::SSDStateUpdateFloat decode step b{b}", updf, update_feeds(b, 1, False), lib, a.threads,
                a.repeats)
        compare(f"mq::SSDScan int8 alone, one step b{b}", scan8, cpu_feeds(b, 1, True), lib, a.threads, a.repeats)
    print(f"load average after {os.getloadavg()}")
    return {"onnxruntime": ort.__version__, "threads": a.threads, "repeats": a.repeats, "statistic": "best"}


# ---- GPU: libmq_scan_cuda.so ------------------------------------------------------------------------------------

def gpu_inputs(b, L, dev, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)

    def q(*s):
        return torch.randint(-128, 128, s, dtype=torch.int8, generator=g).to(dev)

    return dict(qx=q(b, L, H, P), x_scale=SCALES["x"], qdt=q(b, L, H), dt_scale=SCALES["dt"],
                A=(-torch.exp(torch.rand(H, generator=g) * 3 - 1.5)).to(dev), qB=q(b, L, G, N), B_scale=SCALES["B"],
                qC=q(b, L, G, N), C_scale=SCALES["C"], D=torch.randn(H, generator=g).to(dev),
                dt_bias=(torch.rand(H, generator=g) * 3 - 4).to(dev),
                initial_state=torch.randn(b, H, P, N, generator=g).to(dev))


def gpu_time(fn, iters):
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run_gpu(a):
    import torch

    from mq_deploy.ops import native
    from mq_deploy.ops.ssd import ssd_scan_int8_ref

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    kw = gpu_inputs(2, 300, "cpu", seed=1)
    want = ssd_scan_int8_ref(**kw)
    got = native.ssd_scan_int8_cuda(**{k: (v.to(dev) if hasattr(v, "to") else v) for k, v in kw.items()})
    torch.cuda.synchronize()
    parity = float((got.cpu() - want).abs().max() / want.abs().max())
    print(f"{name}; parity with ssd_scan_int8_ref (b2 L300): rel err {parity:.2e}")
    print(f"{'kernel (mamba2-130m layer: H 24, P 64, G 1, N 128)':<46} | {'ms':>8} | {'us/token':>9} | state GB/s")
    state_bytes = H * P * N * 4
    for b, L, split in ((1, 256, "auto"), (1, 1024, "auto"), (1, 1024, "0"), (1, 4096, "auto"), (4, 1024, "auto")):
        os.environ["MQ_SCAN_CUDA_SPLIT"] = split
        kw = gpu_inputs(b, L, dev)
        ms = gpu_time(lambda: native.ssd_scan_int8_cuda(**kw), a.iters)
        print(f"{f'prefill b{b} L{L} split={split}':<46} | {ms:>8.3f} | {ms * 1e3 / (b * L):>9.3f} |", flush=True)
        ROWS.append({"kernel": "prefill", "batch": b, "seqlen": L, "split": split, "ms": ms})
    os.environ.pop("MQ_SCAN_CUDA_SPLIT", None)
    for b in (1, 8, 64):
        kw = gpu_inputs(b, 1, dev)
        state = kw["initial_state"]
        ms = gpu_time(lambda: native.ssd_scan_int8_cuda(**kw, out_state=state, step=True), a.iters)
        gbps = 2 * b * state_bytes / (ms * 1e-3) / 1e9     # the state read and written once
        print(f"{f'decode step b{b} (state in place)':<46} | {ms:>8.4f} | {ms * 1e3 / b:>9.3f} | {gbps:>8.0f}",
              flush=True)
        ROWS.append({"kernel": "step", "batch": b, "ms": ms, "state_GBps": gbps})
    L = 256
    kw = gpu_inputs(1, L, dev)
    state = kw["initial_state"].clone()
    steps = [dict(kw, qx=kw["qx"][:, t:t + 1].contiguous(), qdt=kw["qdt"][:, t:t + 1].contiguous(),
                  qB=kw["qB"][:, t:t + 1].contiguous(), qC=kw["qC"][:, t:t + 1].contiguous(), initial_state=state)
             for t in range(L)]

    def looped():
        for s in steps:
            native.ssd_scan_int8_cuda(**s, out_state=state, step=True)

    ms_loop = gpu_time(looped, max(3, a.iters // 10))
    ms_pre = gpu_time(lambda: native.ssd_scan_int8_cuda(**kw), a.iters)
    print(f"{f'{L} decode steps in a row vs one prefill of {L}':<46} | {ms_loop:>8.3f} | prefill {ms_pre:.3f} ms: "
          f"{ms_loop / ms_pre:.1f}x", flush=True)
    ROWS.append({"kernel": "looped_steps_vs_prefill", "seqlen": L, "looped_ms": ms_loop, "prefill_ms": ms_pre})
    return {"gpu": name, "parity_rel_err": parity, "iters": a.iters, "statistic": "mean"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="time the CUDA kernels instead of the ONNX Runtime ops")
    ap.add_argument("--lib", help="the custom-op library (default: mq_deploy/_native/libmq_scan_ort.so)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra_op_num_threads, both sessions")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50, help="--gpu: calls per timing")
    ap.add_argument("--json", metavar="OUT", help="write the figures and the run's load here")
    a = ap.parse_args()
    meta = RunMeta()
    head = run_gpu(a) if a.gpu else run_cpu(a)
    if a.json:
        write(a.json, {**head, "shape": {"heads": H, "head_dim": P, "groups": G, "d_state": N, "d_conv": K},
                       "rows": ROWS}, meta)


if __name__ == "__main__":
    main()
