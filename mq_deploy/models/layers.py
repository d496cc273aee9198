"""Layers every family shares, and the interface every family's mixer module provides."""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def weightless_rms_norm(x, eps: float):
    """x / rms(x) over the last axis, computed in at least fp32 (FalconMamba's norm of dt, B and C)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def at_least_fp32(t):
    """SSM parameters (A, D, dt bias) are kept in fp32 for half-precision models, as in mamba-ssm."""
    return t if t.dtype == torch.float64 else t.float()


def causal_conv1d(x, weight, bias=None, conv_state=None):
    """Depthwise causal conv in channels-last layout. x [b, L, C]; weight [C, 1, K].

    conv_state [b, C, K-1] holds the inputs before x (zeros when None). Returns (y, new_conv_state).
    """
    k = weight.shape[-1]
    bsz, seqlen, dim = x.shape
    prev = (x.new_zeros(bsz, k - 1, dim) if conv_state is None else conv_state.transpose(1, 2).to(x.dtype))
    xp = torch.cat([prev, x], dim=1)                               # [b, L+K-1, C]
    w = weight[:, 0, :].t()                                        # [K, C]
    y = xp[:, k - 1:] * w[k - 1]
    for j in range(k - 1):
        y = y + xp[:, j:j + seqlen] * w[j]
    if bias is not None:
        y = y + bias
    return y, xp[:, seqlen:].transpose(1, 2)


class MixerBase(nn.Module):
    """What the pipeline asks of a family's mixer module:

    - `forward(hidden, state=None, return_state=False)` and `step(hidden, *states)` (one token; states
      as the family's StateSpecs list them) -> (out, *new_states);
    - `act_hook(name, tensor) -> tensor` sees every quant point (calibration observes, fake quant rounds);
    - `readers()` / `writers()`: the linears that read the block norm's output and write the residual
      stream (residual rotations and norm fusion fold into them);
    - `out_linear` (out_proj; attention's o_proj, an MLP's down_proj) and the `out_rotation` buffer: the
      optional online rotation of its input."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # optional online rotation of out_proj's input (transforms.fold.set_online_out_rotation)
        self.register_buffer("out_rotation", None)
        self.act_hook = None

    @property
    def family(self):
        from mq_deploy.families import family_of

        return family_of(self.cfg)

    def _q(self, name, t):
        return t if self.act_hook is None else self.act_hook(name, t)

    def readers(self) -> list:
        return [self.in_proj]

    def writers(self) -> list:
        return [self.out_linear]

    @property
    def out_linear(self):
        """The linear whose input the online rotation acts on (and that writes the residual stream)."""
        return self.out_proj

    def weight_modules(self) -> list:
        """(site name, module) of every quantized weight, in the family's order."""
        return [(s, getattr(self, s)) for s in self.family.site_names(self.cfg) if getattr(self, s, None) is not None]

    def _rotate_out(self, y):
        from mq_deploy.ops.hadamard import rotate

        return y if self.out_rotation is None else rotate(y, self.out_rotation)
