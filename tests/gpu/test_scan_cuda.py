"""libmq_scan_cuda.so on torch CUDA tensors against selective_scan_int8_ref (skipped without a GPU).

Build the library first:  python -m mq_deploy.ops.native --build --cuda  (or set MQ_SCAN_CUDA_LIB).

Tolerances (rel_err = max |diff| / max |ref|): 1e-4 for float32 output. The library is built with
--use_fast_math, so exp2/exp are the SFU approximations (relative error ~2^-22) and softplus, sigmoid
use __expf; with the different summation order that is a few float32 ulps per step, and the decaying
recurrence keeps it from growing with L. The reference runs on the CPU in float32.
float16 output: that bound plus half an fp16 ulp of each element.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

from mq_deploy.errors import MQUserError  # noqa: E402
from mq_deploy.ops import native  # noqa: E402
from mq_deploy.ops.selective_scan import selective_scan_int8_ref  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import rel_err  # noqa: E402
from helpers import decode_steps, make, with_edges  # noqa: E402

if not os.path.exists(native.cuda_library_path()):
    pytest.skip(f"{native.cuda_library_path()} not built: python -m mq_deploy.ops.native --build --cuda",
                allow_module_level=True)

TOL = 1e-4
DEV = torch.device("cuda")


def to_dev(kw):
    return {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def check(got, want, tol=TOL, what="y"):
    e = rel_err(got.float().cpu(), want)
    print(f"{what}: rel err {e:.2e} (tol {tol:.0e})")
    assert e < tol


# chunk lengths are 2048 / kN (128 steps at N = 16, 32 at N = 64): lengths straddle them; d straddles
# the 128-channel block; N = 7, 24, 40 and 100 use padded states of the 16, 32, 64 and 128 instantiations,
# N = 200 the spilling 256 one: every instantiation of the scan kernel.
# Small batch * D with L >= 128 takes the L-split (segments of >= 64 steps, two passes): b1-L1000
# cuts into 15 uneven segments, b2-L129 into 2, b3-L300 into 4; "split=0" runs the same unsplit.
SHAPES = [(1, 1, 1, 16), (2, 129, 130, 16), (3, 300, 77, 64), (1, 65, 33, 7), (2, 40, 20, 40), (1, 20, 9, 200),
          (1, 1000, 70, 16), (1, 200, 150, 200), (1, 300, 20, 24), (2, 150, 40, 100)]


@pytest.fixture(params=["split=auto", "split=0"])
def split(request, monkeypatch):
    if request.param == "split=0":
        monkeypatch.setenv("MQ_SCAN_CUDA_SPLIT", "0")   # read by the library at each call
    else:
        monkeypatch.delenv("MQ_SCAN_CUDA_SPLIT", raising=False)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b%d-L%d-d%d-n%d" % s)
@pytest.mark.parametrize("z,gate,h0", [(True, False, False), (False, False, True), (True, True, True)],
                         ids=["silu", "noz-h0", "gate-h0"])
def test_scan_matches_reference(shape, z, gate, h0, split):
    kw = make(*shape, z=z, gate=gate, h0=h0)
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, h = native.selective_scan_int8_cuda(**to_dev(kw), return_last_state=True)
    torch.cuda.synchronize()
    check(y, want_y)
    check(h, want_h, what="h_last")


@pytest.mark.parametrize("shape", [(1, 300, 40, 16), (1, 200, 20, 24), (2, 70, 33, 64), (1, 150, 9, 100),
                                   (1, 20, 9, 200)], ids=lambda s: "b%d-L%d-d%d-n%d" % s)
def test_edge_codes_and_large_dt(shape, split):
    """-128 in every int8 input and delta + bias > 20 on every third channel (helpers.with_edges), one shape
    per instantiation, split and unsplit; the large-dt channels and the others checked apart, same tolerance."""
    kw, big = with_edges(make(*shape, gate=True, h0=True, seed=43))
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, h = native.selective_scan_int8_cuda(**to_dev(kw), return_last_state=True)
    torch.cuda.synchronize()
    y, h = y.cpu(), h.cpu()
    for sel, part in ((big, "delta + bias > 20"), (~big, "other channels")):
        check(y[..., sel], want_y[..., sel], what=f"y, {part}")
        check(h[:, sel], want_h[:, sel], what=f"h_last, {part}")


@pytest.mark.parametrize("n", [16, 5, 64])
def test_decode_step_edges(n):
    """The step kernel (N <= 32) and its scan-kernel fallback (N 64) on -128 codes and delta + bias > 20."""
    kw, big = with_edges(make(2, 3, 21, n, gate=True, h0=True, seed=44))
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, state = decode_steps(to_dev(kw), lambda step, state: native.selective_scan_int8_cuda(
        **step, out_state=state, step=True)[0])
    torch.cuda.synchronize()
    y, state = y.cpu(), state.cpu()
    for sel, part in ((big, "delta + bias > 20"), (~big, "other channels")):
        check(y[..., sel], want_y[..., sel], what=f"y, {part}")
        check(state[:, sel], want_h[:, sel], what=f"state, {part}")


def test_split_and_unsplit_agree_closely(monkeypatch):
    """The L-split reassociates the decay product (exp2(A * sum dt) for a segment): same result to
    float32 rounding, far inside the reference tolerance."""
    dkw = to_dev(make(1, 2048, 96, 16, gate=True, h0=True, seed=11))
    y_split, h_split = native.selective_scan_int8_cuda(**dkw, return_last_state=True)
    monkeypatch.setenv("MQ_SCAN_CUDA_SPLIT", "0")
    y_one, h_one = native.selective_scan_int8_cuda(**dkw, return_last_state=True)
    torch.cuda.synchronize()
    check(y_split, y_one.cpu(), tol=2e-5, what="y split vs unsplit")
    check(h_split, h_one.cpu(), tol=2e-5, what="h_last split vs unsplit")


def test_in_place_state_with_a_long_sequence():
    """h_last aliasing h0 on a sequence long enough to split: the library scans unsplit instead."""
    kw = make(1, 500, 40, 16, gate=True, h0=True, seed=12)
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    dkw = to_dev(kw)
    state = dkw["initial_state"].clone()
    y, _ = native.selective_scan_int8_cuda(**dict(dkw, initial_state=state), out_state=state)
    torch.cuda.synchronize()
    check(y, want_y)
    check(state, want_h, what="state")


def test_fp16_output_and_strided_inputs():
    g = torch.Generator().manual_seed(3)
    b, L, d, n, r = 2, 150, 140, 16, 6
    kw = make(b, L, d, n, gate=True, h0=True, seed=3)
    xdz = torch.randint(-127, 128, (b, L, 3 * d), dtype=torch.int8, generator=g)
    dbc = torch.randint(-127, 128, (b, L, r + 2 * n), dtype=torch.int8, generator=g)
    kw.update(qx=xdz[..., :d], qdelta=xdz[..., d:2 * d], qz=xdz[..., 2 * d:], qB=dbc[..., r:r + n],
              qC=dbc[..., r + n:])
    want = selective_scan_int8_ref(**kw)
    dkw = to_dev(kw)
    check(native.selective_scan_int8_cuda(**dkw), want)
    y = native.selective_scan_int8_cuda(**dkw, out_dtype=torch.float16).float().cpu()
    err = (y - want).abs()
    assert (err <= want.abs() * 2.0**-11 * 1.01 + TOL * want.abs().max()).all(), err.max()


@pytest.mark.parametrize("n", [16, 5, 32, 64])
def test_decode_step_in_place_equals_the_full_scan(n):
    b, L, d = 3, 10, 50
    kw = make(b, L, d, n, gate=True, h0=True, seed=7)
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, state = decode_steps(to_dev(kw), lambda step, state: native.selective_scan_int8_cuda(
        **step, out_state=state, step=True)[0])
    torch.cuda.synchronize()
    check(y, want_y)
    check(state, want_h, what="state")


def test_step_entry_point_rejects_sequences():
    kw = to_dev(make(1, 3, 8, 16))
    with pytest.raises(MQUserError, match="seqlen must be 1"):
        native.selective_scan_int8_cuda(**kw, step=True)


def test_fp16_input_twin_matches_on_the_same_values():
    """The bench twin reads half inputs: fed the dequantized values it computes the same scan."""
    import ctypes
    kw = make(2, 100, 70, 16, gate=True, h0=True, seed=9)
    want = selective_scan_int8_ref(**kw)
    dkw = to_dev(kw)
    p, y, _, _keep = native._prepare(*[dkw.get(k) for k in (
        "qx", "x_scale", "qdelta", "delta_scale", "A", "qB", "B_scale", "qC", "C_scale", "D", "qz", "z_scale",
        "delta_bias")], True, dkw["initial_state"], False, dkw["gate_scale"], torch.float32, None, "cuda")
    halves = [(dkw[q].float() * kw[s]).half().contiguous() for q, s in
              (("qx", "x_scale"), ("qdelta", "delta_scale"), ("qB", "B_scale"), ("qC", "C_scale"), ("qz", "z_scale"))]
    lib = native.load_cuda_library()
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    rc = lib.mq_scan_cuda_f16in(ctypes.byref(p), *[ctypes.c_void_p(t.data_ptr()) for t in halves], stream)
    assert rc == 0, native.last_error(lib)
    torch.cuda.synchronize()
    # half holds the int8 codes times a scale only approximately (11-bit mantissa): 1e-3
    check(y, want, tol=1e-3)
