"""The int8 CUDA scan (libmq_scan_cuda.so): achieved bandwidth against a device-to-device copy, and
time against the same kernel reading fp16 inputs (the benchmark twin mq_scan_cuda_f16in).

    python -m mq_deploy.ops.native --build --cuda     # once
    python bench/scan_gpu.py [--iters 50]

Shapes: batch 1 and 8, L = 2048, D = 1536 (mamba-130m) and 5120 (mamba-2.8b), N = 16, y in fp16.
Bytes moved per call, counted as the minimum traffic: int8 x, delta, z (3 B per element), B and C
(2 * N B per token), y (2 B per element); the fp16 twin reads 6 B per element and 4 * N per token.
'copy' is torch's device-to-device copy of a buffer of the same total traffic (read + write).
Expected: the int8 kernel's time advantage over the fp16 twin is at most 8/5 = 1.6x (traffic bound).
Prints the parity of the int8 kernel with selective_scan_int8_ref on a small shape first.
"""

import argparse
import ctypes

import torch

from mq_deploy.ops import native
from mq_deploy.ops.selective_scan import selective_scan_int8_ref

SHAPES = [(b, 2048, d, 16) for b in (1, 8) for d in (1536, 5120)]


def inputs(b, L, d, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def q(*s):
        return torch.randint(-127, 128, s, dtype=torch.int8, generator=g).to(device)

    return dict(qx=q(b, L, d), x_scale=0.02, qdelta=q(b, L, d), delta_scale=0.015,
                A=(-torch.rand(d, n, generator=g) * 2 - 0.05).to(device), qB=q(b, L, n), B_scale=0.03,
                qC=q(b, L, n), C_scale=0.025, D=torch.randn(d, generator=g).to(device), qz=q(b, L, d),
                z_scale=0.03, delta_bias=(torch.randn(d, generator=g) * 0.5 - 1.0).to(device))


def gpu_time(fn, iters):
    """Mean milliseconds per call over iters calls, after a warm-up, with CUDA events."""
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


def params(kw, out_dtype):
    p, y, _, keep = native._prepare(kw["qx"], kw["x_scale"], kw["qdelta"], kw["delta_scale"], kw["A"], kw["qB"],
                                    kw["B_scale"], kw["qC"], kw["C_scale"], kw["D"], kw["qz"], kw["z_scale"],
                                    kw["delta_bias"], True, None, False, None, out_dtype, None, "cuda")
    return p, y, keep


def check_parity(lib):
    kw = inputs(2, 300, 200, 16, "cpu", seed=1)
    want = selective_scan_int8_ref(**kw)
    got = native.selective_scan_int8_cuda(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()})
    err = ((got.cpu() - want).abs().max() / want.abs().max()).item()
    print(f"parity b2 L300 D200 N16 vs selective_scan_int8_ref: rel err {err:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: bench/scan_gpu.py needs a GPU")
    lib = native.load_cuda_library()
    print(torch.cuda.get_device_name(), f"| {native.cuda_library_path()}")
    check_parity(lib)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    print(f"{'b':>2} {'L':>5} {'D':>5} {'N':>3} | {'int8 ms':>8} {'GB/s':>7} {'copy GB/s':>9} {'of copy':>7} | "
          f"{'fp16in ms':>9} {'fp16in/int8':>11}")
    for b, L, d, n in SHAPES:
        kw = inputs(b, L, d, n, "cuda")
        p, y, keep = params(kw, torch.float16)

        def run_int8():
            rc = lib.mq_scan_cuda(ctypes.byref(p), stream)
            if rc:
                raise RuntimeError(native.last_error(lib))

        halves = [(kw[q].float() * kw[s]).half() for q, s in (("qx", "x_scale"), ("qdelta", "delta_scale"),
                                                              ("qB", "B_scale"), ("qC", "C_scale"), ("qz", "z_scale"))]
        hptr = [ctypes.c_void_p(t.data_ptr()) for t in halves]

        def run_f16():
            rc = lib.mq_scan_cuda_f16in(ctypes.byref(p), *hptr, stream)
            if rc:
                raise RuntimeError(native.last_error(lib))

        traffic = b * L * (3 * d + 2 * n + 2 * d) + d * n * 4 + 3 * d * 4
        src = torch.empty(traffic // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t_int8 = gpu_time(run_int8, a.iters)
        t_f16 = gpu_time(run_f16, a.iters)
        t_copy = gpu_time(lambda: dst.copy_(src), a.iters)
        bw = traffic / t_int8 / 1e6
        bw_copy = 2 * src.numel() / t_copy / 1e6
        print(f"{b:>2} {L:>5} {d:>5} {n:>3} | {t_int8:>8.3f} {bw:>7.0f} {bw_copy:>9.0f} {bw / bw_copy:>6.0%} | "
              f"{t_f16:>9.3f} {t_f16 / t_int8:>10.2f}x")
        del keep, halves


if __name__ == "__main__":
    main()
