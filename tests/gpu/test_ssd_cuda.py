"""libmq_scan_cuda.so's Mamba2 scan (mq_ssd_cuda, mq_ssd_cuda_ws, mq_ssd_step_cuda) on torch CUDA tensors against
mq_deploy.ops.ssd.ssd_scan_int8_ref (skipped without a GPU).

Build the library first:  python -m mq_deploy.ops.native --build --cuda  (or set MQ_SCAN_CUDA_LIB).

Tolerance 1e-4 as rel_err (max |diff| / max |ref|), heads with dt + bias > 20 and the others checked apart: the
library is built with --use_fast_math, so exp, log1p are the SFU approximations (relative error ~2^-21), on top of
the summation order (kS states a thread, a reduction over kR threads) and the L-split's exp(sum dt A) in place of
a product of per-step decays; a few float32 ulps per step, which the decaying recurrence does not accumulate. The
reference runs on the CPU in float32. The same kernels' logic (chunks, split, step kernel, workspace) is checked
on the CPU without a GPU by tests/test_native_ssd.py (the .cu translated onto tests/cuda_emu).
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

from mq_deploy.ops import native  # noqa: E402
from mq_deploy.ops.ssd import ssd_scan_int8_ref  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import rel_err  # noqa: E402

if not os.path.exists(native.cuda_library_path()):
    pytest.skip(f"{native.cuda_library_path()} not built: python -m mq_deploy.ops.native --build --cuda",
                allow_module_level=True)

TOL = 1e-4
DEV = torch.device("cuda")
SCALES = dict(x=0.02, dt=0.015, B=0.03, C=0.025)


def make(b, L, H, P, G, N, seed=0, per_channel=False):
    """Fresh codes (-128 in about a tenth, first and last included) and parameters; dt_bias 24 on every other head
    (softplus's linear range). Returns (kwargs of ssd_scan_int8_ref on the CPU, mask of the large-dt heads)."""
    g = torch.Generator().manual_seed(seed)

    def q(*s):
        t = torch.randint(-127, 128, s, dtype=torch.int8, generator=g)
        t[torch.rand(s, generator=g) < 0.1] = -128
        t.view(-1)[0] = t.view(-1)[-1] = -128
        return t

    kw = dict(qx=q(b, L, H, P), x_scale=SCALES["x"], qdt=q(b, L, H), dt_scale=SCALES["dt"],
              A=-torch.exp(torch.rand(H, generator=g) * 3 - 1.5), qB=q(b, L, G, N), B_scale=SCALES["B"],
              qC=q(b, L, G, N), C_scale=SCALES["C"], D=torch.randn(H, generator=g),
              dt_bias=torch.randn(H, generator=g) * 0.5 - 1.0, initial_state=torch.randn(b, H, P, N, generator=g))
    if per_channel:
        for name, ch in (("x", H * P), ("dt", H), ("B", G * N), ("C", G * N)):
            kw[f"{name}_scale"] = SCALES[name] * (0.5 + torch.rand(ch, generator=g))
    big = torch.zeros(H, dtype=torch.bool)
    big[::2] = True
    kw["dt_bias"][big] = 24.0
    return kw, big


def to_dev(kw):
    return {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def check_apart(got, want, big, what, axis, tol=TOL):
    got = got.float().cpu()
    for sel, name in ((big, "dt + bias > 20"), (~big, "other heads")):
        idx = sel.nonzero().flatten()
        if idx.numel():
            e = rel_err(got.index_select(axis, idx), want.index_select(axis, idx))
            print(f"{what}, {name}: rel err {e:.2e} (tol {tol:.0e})")
            assert e < tol


@pytest.fixture(params=["split=auto", "split=0"])
def split(request, monkeypatch):
    if request.param == "split=0":
        monkeypatch.setenv("MQ_SCAN_CUDA_SPLIT", "0")   # read by the library at each call
    else:
        monkeypatch.delenv("MQ_SCAN_CUDA_SPLIT", raising=False)
    return request.param


# (b, L, H, P, G, N): every instantiation (N 16, 32 with 24 padded, 64, 128, 256; 5 and 40 padded); head_dim 7,
# 12, 64, 80; 1, 2, 8 groups; L = 1, past a chunk (16), long enough to split at small b * H * P (b1-L1000), the
# mamba2-130m layer (24 heads of 64, N 128) at b 1 and 4
SHAPES = [(1, 1, 2, 12, 1, 16), (2, 37, 4, 80, 2, 64), (1, 1000, 2, 12, 1, 16), (1, 300, 8, 64, 8, 128),
          (3, 70, 2, 7, 2, 256), (1, 200, 1, 5, 1, 40), (2, 129, 4, 16, 2, 24), (1, 256, 24, 64, 1, 128),
          (4, 256, 24, 64, 1, 128)]


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b%d-L%d-H%d-P%d-G%d-N%d" % s)
def test_scan_matches_reference(shape, per_channel, split):
    kw, big = make(*shape, seed=sum(shape), per_channel=per_channel)
    want_y, want_h = ssd_scan_int8_ref(**kw, return_last_state=True)
    y, h = native.ssd_scan_int8_cuda(**to_dev(kw), return_last_state=True)
    torch.cuda.synchronize()
    check_apart(y, want_y, big, "y", 2)
    check_apart(h, want_h, big, "h_last", 1)


@pytest.mark.parametrize("limit", [(0.0, 0.5), (0.05, 2.0)])
def test_dt_clamp(limit, split):
    kw, big = make(1, 300, 4, 12, 2, 64, seed=7)
    want_y, want_h = ssd_scan_int8_ref(**kw, dt_limit=limit, return_last_state=True)
    y, h = native.ssd_scan_int8_cuda(**to_dev(kw), dt_limit=limit, return_last_state=True)
    torch.cuda.synchronize()
    check_apart(y, want_y, big, f"y, dt_limit {limit}", 2)
    check_apart(h, want_h, big, f"h_last, dt_limit {limit}", 1)


@pytest.mark.parametrize("N", [16, 5, 64, 128, 256])
def test_decode_step_kernel_in_place(N):
    """L calls of the step kernel with the state updated in place equal the reference over L tokens."""
    kw, big = make(2, 6, 24, 64 if N == 128 else 12, 1 if N == 128 else 2, N, seed=N, per_channel=N == 64)
    want_y, want_h = ssd_scan_int8_ref(**kw, return_last_state=True)
    d = to_dev(kw)
    state = d["initial_state"].clone()
    ys = []
    for t in range(6):
        step = dict(d, qx=d["qx"][:, t:t + 1], qdt=d["qdt"][:, t:t + 1], qB=d["qB"][:, t:t + 1],
                    qC=d["qC"][:, t:t + 1], initial_state=state)
        ys.append(native.ssd_scan_int8_cuda(**step, out_state=state, step=True)[0])
    torch.cuda.synchronize()
    check_apart(torch.cat(ys, 1), want_y, big, "y of the steps", 2)
    check_apart(state, want_h, big, "state", 1)


def test_caller_workspace(monkeypatch):
    """mq_ssd_cuda_ws (the TensorRT plugin's entry point) with the scratch mq_ssd_cuda_workspace_size asks for, and
    with too little (unsplit): both right, and only the first writes the scratch."""
    import ctypes

    monkeypatch.delenv("MQ_SCAN_CUDA_SPLIT", raising=False)
    kw, big = make(1, 1000, 2, 12, 1, 16, seed=31)
    want_y, want_h = ssd_scan_int8_ref(**kw, return_last_state=True)
    d = to_dev(kw)
    p, *_keep = native._ssd_prepare(d["qx"], d["qdt"], d["A"], d["qB"], d["qC"], d["D"], d["dt_bias"], (0.0, None),
                                    d["initial_state"], True, {k: kw[f"{k}_scale"] for k in SCALES}, None, "cuda")
    need = native.load_cuda_library().mq_ssd_cuda_workspace_size(ctypes.byref(p))
    assert need > 0
    for give in (need, need // 2):
        ws = torch.zeros(give, dtype=torch.uint8, device=DEV)
        y, h = native.ssd_scan_int8_cuda(**d, return_last_state=True, workspace=ws)
        torch.cuda.synchronize()
        check_apart(y, want_y, big, f"y, {give} of {need} workspace bytes", 2)
        check_apart(h, want_h, big, f"h_last, {give} of {need} workspace bytes", 1)
        assert (ws.count_nonzero().item() > 0) == (give == need)


def test_step_entry_point_rejects_sequences():
    from mq_deploy.errors import MQUserError

    kw, _ = make(1, 3, 2, 12, 1, 16)
    with pytest.raises(MQUserError, match="seqlen must be 1"):
        native.ssd_scan_int8_cuda(**to_dev(kw), step=True)
