"""selective_scan_int8_ref is the contract of the int8 op: the model's fake-quantized scan (rounding at
the x, dt, B, C, z quant points) must compute exactly what it computes on the integer codes."""

import pytest
import torch

from mq_deploy.families.mamba1 import folds as m1_folds
from mq_deploy.ops.quant import quantize, scale_from_amax
from mq_deploy.ops.selective_scan import selective_scan_int8_ref, selective_scan_ref

from conftest import rel_err
from helpers import small_lm


def codes(t):
    s = scale_from_amax(t.abs().max(), 8)
    return quantize(t, s, 8), s


@pytest.mark.parametrize("gated", [False, True])
def test_mixer_fake_quant_scan_equals_int8_reference(gated):
    """Tolerance 2e-5: the model runs the fast scan, the contract the reference loop, both float32 on
    the same dequantized inputs (the fast-vs-reference tolerance of test_selective_scan)."""
    m = small_lm(d_state=16)
    mixer = m.layers[0].mixer
    if gated:
        m1_folds.smooth_out_proj_into_gate(mixer, torch.rand(mixer.cfg.d_inner) * 2 + 0.5)
    codes_seen, scales, y_model = {}, {}, {}

    def hook(name, t):   # per-tensor scales from this very batch, then round and keep the codes
        if name == "out_proj":
            y_model["y"] = t           # the scan's output, before out_proj's own quant point
            return t
        scales[name] = scale_from_amax(t.abs().max(), 8)
        codes_seen[name] = quantize(t, scales[name], 8)
        return codes_seen[name].float() * scales[name]

    mixer.act_hook = hook
    with torch.no_grad():
        mixer(m.layers[0].norm(m.embedding(torch.randint(0, 50, (2, 13)))))
        y_int8 = selective_scan_int8_ref(
            codes_seen["x"], scales["x"], codes_seen["dt"], scales["dt"], -torch.exp(mixer.A_log),
            codes_seen["B"], scales["B"], codes_seen["C"], scales["C"], mixer.D, codes_seen["z"], scales["z"],
            mixer.dt_proj.bias, gate_scale=mixer.gate_scale)
    e = rel_err(y_int8, y_model["y"])
    print(f"gated={gated}: int8 reference vs fake-quant model, rel err {e:.2e}")
    assert e < 2e-5


def test_int8_reference_dequantizes_then_runs_the_float_scan():
    g = torch.Generator().manual_seed(0)
    b, L, d, n = 2, 9, 6, 16
    x, dt, z = (torch.randn(b, L, d, generator=g) for _ in range(3))
    B, C = (torch.randn(b, L, n, generator=g) for _ in range(2))
    A, D, bias, h0 = -torch.rand(d, n, generator=g) - 0.1, torch.randn(d, generator=g), torch.randn(d, generator=g), torch.randn(b, d, n, generator=g)
    (qx, sx), (qdt, sdt), (qB, sB), (qC, sC), (qz, sz) = (codes(t) for t in (x, dt, B, C, z))
    y, h = selective_scan_int8_ref(qx, sx, qdt, sdt, A, qB, sB, qC, sC, D, qz, sz, bias, True, h0, True)
    want_y, want_h = selective_scan_ref(qx * sx, qdt * sdt, A, qB * sB, qC * sC, D, qz * sz, bias, True, h0, True)
    assert torch.equal(y, want_y) and torch.equal(h, want_h)
    with pytest.raises(ValueError, match="int8"):
        selective_scan_int8_ref(x, sx, qdt, sdt, A, qB, sB, qC, sC)
