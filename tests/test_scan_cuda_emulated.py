"""The CUDA kernels' logic on the CPU: scan_cuda.cu translated onto cuda_emu/cuda_emu.h (blocks in
turn, threads as std::threads, __syncthreads as a barrier) and checked against
selective_scan_int8_ref. This runs without a GPU, so the chunking, padding, L-split, decode-step and
stride logic of the kernels is tested here even where nothing CUDA can run; the real kernels'
numerics (SFU exp2, fast-math) are left to test_scan_cuda.py on a GPU.

Tolerance 2e-5 rel_err, as for the CPU library: the emulation computes the header's host math.
"""

import ctypes
import os
import shutil
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "cuda_emu"))

from mq_deploy.ops import native  # noqa: E402
from mq_deploy.ops.selective_scan import selective_scan_int8_ref  # noqa: E402

from conftest import rel_err  # noqa: E402
from helpers import decode_steps, make, with_edges  # noqa: E402

if shutil.which("g++") is None:
    pytest.skip("no g++ to build the CUDA emulation", allow_module_level=True)

TOL = 2e-5


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import build_emu
    path = build_emu.build(str(tmp_path_factory.mktemp("cuda_emu")))
    lib = native._declare(ctypes.CDLL(path))
    P = ctypes.POINTER(native.MQScanParams)
    for fn in (lib.mq_scan_cuda, lib.mq_scan_step_cuda):
        fn.argtypes = [P, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    lib.mq_scan_cuda_f16in.argtypes = [P] + [ctypes.c_void_p] * 6
    lib.mq_scan_cuda_f16in.restype = ctypes.c_int
    return lib


def run(lib, kw, step=False, out_dtype=torch.float32, out_state=None, f16in=None):
    p, y, h, _keep = native._prepare(
        kw["qx"], kw["x_scale"], kw["qdelta"], kw["delta_scale"], kw["A"], kw["qB"], kw["B_scale"], kw["qC"],
        kw["C_scale"], kw.get("D"), kw.get("qz"), kw.get("z_scale"), kw.get("delta_bias"), True,
        kw.get("initial_state"), True, kw.get("gate_scale"), out_dtype, out_state, "cpu")
    if f16in is not None:
        rc = lib.mq_scan_cuda_f16in(ctypes.byref(p), *[None if t is None else ctypes.c_void_p(t.data_ptr())
                                                        for t in f16in], None)
    else:
        rc = (lib.mq_scan_step_cuda if step else lib.mq_scan_cuda)(ctypes.byref(p), None)
    assert rc == 0, native.last_error(lib)
    return y, h


def check(got, want, tol=TOL, what="y"):
    e = rel_err(got.float(), want)
    print(f"{what}: rel err {e:.2e} (tol {tol:.0e})")
    assert e < tol


# chunks are 2048 / kN steps; (1, 1000, 70, 16) splits into 15 segments, (2, 129, 130, 16) into 2
# (d straddles two 128-channel blocks), (3, 300, 77, 64) into 4. Every instantiation of the scan kernel:
# kN = 16 (N 16, and 7 padded), 32 (N 24 padded), 64 (N 64, and 40 padded), 128 (N 100 padded, state
# spilled), 256 (N 200 padded)
SHAPES = [(1, 1, 1, 16), (2, 129, 130, 16), (3, 300, 77, 64), (1, 65, 33, 7), (2, 40, 20, 40),
          (1, 20, 9, 200), (1, 1000, 70, 16), (1, 70, 20, 24), (1, 40, 9, 100)]


@pytest.mark.parametrize("split", ["auto", "0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b%d-L%d-d%d-n%d" % s)
def test_scan_kernel_logic(emu, shape, split, monkeypatch):
    if split == "0":
        monkeypatch.setenv("MQ_SCAN_CUDA_SPLIT", "0")
    else:
        monkeypatch.delenv("MQ_SCAN_CUDA_SPLIT", raising=False)
    kw = make(*shape, gate=True, h0=True)
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, h = run(emu, kw)
    check(y, want_y)
    check(h, want_h, what="h_last")


# one shape per scan-kernel instantiation (kN 16, 32, 64, 128, 256), the first two long enough to split
EDGE_SHAPES = [(1, 300, 40, 16), (1, 200, 20, 24), (2, 70, 33, 64), (1, 40, 9, 100), (1, 20, 9, 200)]


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "b%d-L%d-d%d-n%d" % s)
def test_edge_codes_and_large_dt(emu, shape, monkeypatch):
    """-128 in every int8 input and delta + bias > 20 on every third channel (helpers.with_edges), the large-dt
    channels and the others checked apart; same tolerance."""
    monkeypatch.delenv("MQ_SCAN_CUDA_SPLIT", raising=False)
    kw, big = with_edges(make(*shape, gate=True, h0=True, seed=43))
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, h = run(emu, kw)
    for sel, part in ((big, "delta + bias > 20"), (~big, "other channels")):
        check(y[..., sel], want_y[..., sel], what=f"y, {part}")
        check(h[:, sel], want_h[:, sel], what=f"h_last, {part}")


def test_decode_step_kernel_edges(emu):
    """The step kernel (N <= 32) on -128 codes and delta + bias > 20."""
    kw, big = with_edges(make(2, 3, 21, 16, gate=True, h0=True, seed=44))
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, state = decode_steps(kw, lambda step, state: run(emu, step, step=True, out_state=state)[0])
    for sel, part in ((big, "delta + bias > 20"), (~big, "other channels")):
        check(y[..., sel], want_y[..., sel], what=f"y, {part}")
        check(state[:, sel], want_h[:, sel], what=f"state, {part}")


def test_no_z_no_state_fp16_and_strides(emu):
    g = torch.Generator().manual_seed(3)
    b, L, d, n, r = 2, 150, 140, 16, 6
    kw = make(b, L, d, n, z=True, gate=False, h0=False, seed=3)
    xdz = torch.randint(-127, 128, (b, L, 3 * d), dtype=torch.int8, generator=g)
    dbc = torch.randint(-127, 128, (b, L, r + 2 * n), dtype=torch.int8, generator=g)
    kw.update(qx=xdz[..., :d], qdelta=xdz[..., d:2 * d], qz=xdz[..., 2 * d:], qB=dbc[..., r:r + n],
              qC=dbc[..., r + n:])
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, h = run(emu, kw)
    check(y, want_y)
    check(h, want_h, what="h_last")
    y16, _ = run(emu, kw, out_dtype=torch.float16)
    err = (y16.float() - want_y).abs()
    assert (err <= want_y.abs() * 2.0**-11 * 1.01 + TOL * want_y.abs().max()).all()
    nz = dict(kw)
    nz.pop("qz"), nz.pop("z_scale")
    check(run(emu, nz)[0], selective_scan_int8_ref(**nz))


# the step kernel's lane counts (np = 16, 8 for N 5, 32) and the scan-kernel fallback above 32 (N 64)
@pytest.mark.parametrize("n", [16, 5, 32, 64])
def test_decode_step_kernel_in_place(emu, n):
    b, L, d = 2, 4, 21      # 42 channels: the last block of 256 threads is partly idle
    kw = make(b, L, d, n, gate=True, h0=True, seed=7)
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, state = decode_steps(kw, lambda step, state: run(emu, step, step=True, out_state=state)[0])
    check(y, want_y)
    check(state, want_h, what="state")


def test_long_in_place_scan_does_not_split(emu):
    kw = make(1, 400, 40, 16, gate=True, h0=True, seed=12)
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    state = kw["initial_state"].clone()
    y, _ = run(emu, dict(kw, initial_state=state), out_state=state)
    check(y, want_y)
    check(state, want_h, what="state")


def test_fp16_input_twin(emu):
    kw = make(2, 200, 70, 16, gate=True, h0=True, seed=9)
    want = selective_scan_int8_ref(**kw)
    halves = [(kw[q].float() * kw[s]).half().contiguous() for q, s in
              (("qx", "x_scale"), ("qdelta", "delta_scale"), ("qB", "B_scale"), ("qC", "C_scale"), ("qz", "z_scale"))]
    y, _ = run(emu, kw, f16in=halves)
    check(y, want, tol=1e-3)   # the half inputs hold q * scale to 11 bits only


def test_step_entry_point_rejects_sequences(emu):
    kw = make(1, 3, 8, 16)
    p, _, _, _keep = native._prepare(kw["qx"], kw["x_scale"], kw["qdelta"], kw["delta_scale"], kw["A"], kw["qB"],
                                     kw["B_scale"], kw["qC"], kw["C_scale"], None, None, None, None, True, None,
                                     False, None, torch.float32, None, "cpu")
    assert emu.mq_scan_step_cuda(ctypes.byref(p), None) == native.ERR_INVALID
    assert "seqlen must be 1" in native.last_error(emu)


def test_caller_workspace_entry_point(emu, monkeypatch):
    """mq_scan_cuda_ws (what the TensorRT plugin calls with its enqueue workspace) splits into the given
    scratch, scans unsplit with too little, and mq_scan_cuda_workspace_size is 0 where nothing splits."""
    monkeypatch.delenv("MQ_SCAN_CUDA_SPLIT", raising=False)
    P = ctypes.POINTER(native.MQScanParams)
    emu.mq_scan_cuda_workspace_size.argtypes = [P]
    emu.mq_scan_cuda_workspace_size.restype = ctypes.c_size_t
    emu.mq_scan_cuda_ws.argtypes = [P, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    emu.mq_scan_cuda_ws.restype = ctypes.c_int
    kw = make(1, 1000, 70, 16, gate=True, h0=True, seed=31)      # splits into 15 segments
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    for give in ("enough", "too little"):
        p, y, h, _keep = native._prepare(
            kw["qx"], kw["x_scale"], kw["qdelta"], kw["delta_scale"], kw["A"], kw["qB"], kw["B_scale"], kw["qC"],
            kw["C_scale"], kw["D"], kw["qz"], kw["z_scale"], kw["delta_bias"], True, kw["initial_state"], True,
            kw["gate_scale"], torch.float32, None, "cpu")
        need = emu.mq_scan_cuda_workspace_size(ctypes.byref(p))
        assert need == 15 * 70 * 4 * 17        # segments x channels x (dt sum + 16 state floats)
        ws = torch.zeros(need if give == "enough" else need // 2, dtype=torch.uint8)
        assert emu.mq_scan_cuda_ws(ctypes.byref(p), ws.data_ptr(), ws.numel(), None) == 0, native.last_error(emu)
        check(y, want_y)
        check(h, want_h, what="h_last")
        assert (ws.count_nonzero() > 0) == (give == "enough")    # the split used the caller's scratch
    small = make(8, 40, 70, 16, seed=32)
    p, *_ = native._prepare(small["qx"], small["x_scale"], small["qdelta"], small["delta_scale"], small["A"],
                            small["qB"], small["B_scale"], small["qC"], small["C_scale"], small["D"], small["qz"],
                            small["z_scale"], small["delta_bias"], True, None, False, None, torch.float32, None, "cpu")
    assert emu.mq_scan_cuda_workspace_size(ctypes.byref(p)) == 0
