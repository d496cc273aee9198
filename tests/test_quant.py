import pytest
import torch

from mq_deploy.ops.quant import dequantize, fake_quantize, qmax, quantize, weight_scales


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_round_trip_error_bound(bits):
    w = torch.randn(16, 40) * torch.logspace(-2, 1, 16)[:, None]
    s = weight_scales(w, bits)
    q = quantize(w, s, bits, axis=0)
    assert q.dtype == torch.int8 and q.abs().max() <= qmax(bits)
    err = (dequantize(q, s, axis=0) - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-7)           # round to nearest: half a step at most
    assert torch.equal(fake_quantize(w, s, bits, axis=0), dequantize(q, s, axis=0))


def test_clamps_outside_range_and_rounds_half_to_even():
    s = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 300.0, -300.0])
    assert quantize(x, s, 8).tolist() == [0, 2, 2, 0, 127, -127]
    assert quantize(x, s, 4).tolist() == [0, 2, 2, 0, 7, -7]
