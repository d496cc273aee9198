"""The Mamba2 mixer in PyTorch, with step-wise decoding.

Parameter names follow mamba-ssm and transformers (in_proj, conv1d, dt_bias, A_log, D, norm.weight,
out_proj), so the loaders only rename prefixes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mq_deploy.families.mamba2.config import Mamba2Config
from mq_deploy.models.layers import MixerBase, at_least_fp32, causal_conv1d
from mq_deploy.ops.ssd import ssd_scan, ssd_state_update


class GatedRMSNorm(nn.Module):
    """The norm between the scan and out_proj, in float32 (as both sources compute it): RMS over groups of
    d_inner / groups channels; the gate silu(z) multiplies before the norm, or after it (norm_before_gate)."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.groups, self.eps, self.before_gate = cfg.norm_groups, cfg.norm_eps, cfg.norm_before_gate
        self.weight = nn.Parameter(torch.ones(cfg.d_inner))

    def forward(self, y, z):
        dtype = y.dtype
        yf = y.to(torch.float64 if dtype == torch.float64 else torch.float32)
        gate = F.silu(z.to(yf.dtype))
        if not self.before_gate:
            yf = yf * gate
        g = yf.unflatten(-1, (self.groups, -1))
        yf = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        out = self.weight * yf.to(dtype)
        return out * gate.to(dtype) if self.before_gate else out


class Mamba2Mixer(MixerBase):
    def __init__(self, cfg: Mamba2Config):
        super().__init__(cfg)
        di, H = cfg.d_inner, cfg.n_heads
        self.in_proj = nn.Linear(cfg.d_model, di + cfg.conv_dim + H, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, padding=cfg.d_conv - 1,
                                bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(cfg) if cfg.rmsnorm else None
        self.out_proj = nn.Linear(di, cfg.d_model, bias=cfg.bias)

    # -- init as in transformers' init_mamba2_weights (A = 1..H, dt log-uniform in [1e-3, 1e-1]) ------------
    @torch.no_grad()
    def reset_parameters(self, generator=None, dt_min=1e-3, dt_max=1e-1):
        H = self.cfg.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(H, generator=generator) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _project(self, hidden):
        cfg = self.cfg
        z, xBC, dt = torch.split(self.in_proj(self._q("in_proj", hidden)), [cfg.d_inner, cfg.conv_dim, cfg.n_heads],
                                 dim=-1)
        return self._q("z", z), xBC, self._q("dt", dt)

    def _split(self, xBC):
        cfg = self.cfg
        x, B, C = torch.split(F.silu(xBC), [cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_groups * cfg.d_state],
                              dim=-1)
        return self._q("x", x), self._q("B", B), self._q("C", C)

    def _params(self):
        return -torch.exp(at_least_fp32(self.A_log)), at_least_fp32(self.D), at_least_fp32(self.dt_bias)

    def _out(self, y, z):
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(self._q("out_proj", self._rotate_out(y)))

    def forward(self, hidden, state=None, return_state=False):
        """hidden [b, L, d] -> [b, L, d]. state/return_state: (conv_state, ssm_state)."""
        cfg = self.cfg
        b, L, _ = hidden.shape
        conv_state, ssm_state = state if state is not None else (None, None)
        z, xBC, dt = self._project(hidden)
        xBC, new_conv = causal_conv1d(self._q("conv1d", xBC), self.conv1d.weight, self.conv1d.bias, conv_state)
        x, B, C = self._split(xBC)
        A, D, dt_bias = self._params()
        H, P, G, N = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        y, last = ssd_scan(x.reshape(b, L, H, P), dt, A, B.reshape(b, L, G, N), C.reshape(b, L, G, N), D, dt_bias,
                           dt_limit=cfg.dt_limit, initial_state=ssm_state, return_last_state=True)
        out = self._out(y.reshape(b, L, cfg.d_inner).to(hidden.dtype), z)
        return (out, (new_conv, last)) if return_state else out

    def step(self, hidden, conv_state, ssm_state):
        """One token. hidden [b, d]; conv_state [b, conv_dim, K-1]; ssm_state [b, H, P, N]."""
        cfg = self.cfg
        b = hidden.shape[0]
        z, xBC, dt = self._project(hidden)
        window = torch.cat([conv_state, self._q("conv1d", xBC).unsqueeze(-1)], dim=-1)        # [b, conv_dim, K]
        xc = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        x, B, C = self._split(xc)
        A, D, dt_bias = self._params()
        H, P, G, N = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        y, new_ssm = ssd_state_update(ssm_state, x.reshape(b, H, P), dt, A, B.reshape(b, G, N), C.reshape(b, G, N),
                                      D, dt_bias, dt_limit=cfg.dt_limit)
        return self._out(y.reshape(b, cfg.d_inner).to(hidden.dtype), z), window[..., 1:], new_ssm
