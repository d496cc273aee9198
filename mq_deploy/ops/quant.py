"""Integer quantization primitives (symmetric): scales, quantize, dequantize, fake-quantize.

Scales are symmetric: scale = amax / (2^(b-1) - 1), zero point 0. Weights use the grid
[-(2^(b-1) - 1), 2^(b-1) - 1] (127 for int8, 7 for int4), which their per-channel amax never leaves.
Activations saturate as ONNX QuantizeLinear (and TensorRT) do, to [-2^(b-1), 2^(b-1) - 1]: a value
clipped by a percentile scale on the negative side becomes -128, not -127, so the fake-quantized
PyTorch model and the exported int8 graph see the same integers (`fake_quantize(..., full_range=True)`).
Rounding is half-to-even, as ONNX QuantizeLinear and torch.round do.
"""

from __future__ import annotations

import torch

from mq_deploy.errors import MQUserError


def qmax(bits: int) -> int:
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise MQUserError(f"unsupported bit width {bits}")
    return 2 ** (bits - 1) - 1


def scale_from_amax(amax: torch.Tensor, bits: int, eps: float = 1e-12) -> torch.Tensor:
    return amax.to(torch.float32).clamp_min(eps) / qmax(bits)


def weight_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scales of a weight [out, ...]."""
    return scale_from_amax(w.detach().reshape(w.shape[0], -1).abs().amax(1), bits)


def _bcast(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or scale.dim() == 0:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    q = qmax(bits)
    return torch.clamp(torch.round(x / _bcast(scale, x, axis)), -q, q).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return q.to(torch.float32) * _bcast(scale, q, axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, axis: int | None = None,
                  full_range: bool = False) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype (no gradient trickery: PTQ only).

    full_range: saturate to [-2^(b-1), 2^(b-1) - 1] as QuantizeLinear does (activations)."""
    s = _bcast(scale.to(x.dtype), x, axis)
    q = qmax(bits)
    return torch.clamp(torch.round(x / s), -q - 1 if full_range else -q, q) * s
