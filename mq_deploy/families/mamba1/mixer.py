"""The Mamba1 mixer in PyTorch, with step-wise decoding.

Parameter names follow mamba-ssm (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj; the Vim
backward branch adds conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b) so the loaders only rename prefixes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mq_deploy.errors import MQUserError
from mq_deploy.families.mamba1.config import MixerConfig
from mq_deploy.models.layers import MixerBase, RMSNorm, at_least_fp32, causal_conv1d, weightless_rms_norm
from mq_deploy.ops.selective_scan import selective_scan, selective_state_update


class MambaMixer(MixerBase):
    def __init__(self, cfg: MixerConfig):
        super().__init__(cfg)
        d, di, n, r = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(d, 2 * di, bias=cfg.bias)
        self.out_proj = nn.Linear(di, d, bias=cfg.bias)
        suffixes = ["", "_b"] if cfg.bimamba else [""]
        for s in suffixes:
            setattr(self, "conv1d" + s, nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1,
                                                  bias=cfg.conv_bias))
            setattr(self, "x_proj" + s, nn.Linear(di, r + 2 * n, bias=False))
            setattr(self, "dt_proj" + s, nn.Linear(r, di, bias=True))
            setattr(self, ("A_b_log" if s else "A_log"), nn.Parameter(torch.empty(di, n)))
            setattr(self, "D" + s, nn.Parameter(torch.ones(di)))
        self._suffixes = suffixes
        if cfg.inner_norm_weights:      # Jamba's dt_layernorm, b_layernorm, c_layernorm
            self.dt_layernorm = RMSNorm(r, cfg.mixer_rms_eps)
            self.b_layernorm = RMSNorm(n, cfg.mixer_rms_eps)
            self.c_layernorm = RMSNorm(n, cfg.mixer_rms_eps)
        # optional smoothing fused into the gate: z * sigmoid(gate_scale * z) instead of silu(z)
        # (families.mamba1.folds.smooth_out_proj_into_gate)
        self.register_buffer("gate_scale", None)

    # -- init as in mamba-ssm (dt in [1e-3, 1e-1] log-uniform, S4D-real A) -------------------------
    @torch.no_grad()
    def reset_parameters(self, generator=None, dt_min=1e-3, dt_max=1e-1):
        cfg = self.cfg
        for s in self._suffixes:
            dt_proj = getattr(self, "dt_proj" + s)
            std = cfg.dt_rank ** -0.5
            dt_proj.weight.uniform_(-std, std, generator=generator)
            dt = torch.exp(torch.rand(cfg.d_inner, generator=generator) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=1e-4)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).repeat(cfg.d_inner, 1)
            getattr(self, "A_b_log" if s else "A_log").copy_(torch.log(A))
            getattr(self, "D" + s).fill_(1.0)

    def _branch_params(self, s):
        return (getattr(self, "conv1d" + s), getattr(self, "x_proj" + s), getattr(self, "dt_proj" + s),
                getattr(self, "A_b_log" if s else "A_log"), getattr(self, "D" + s))

    def _scan_inputs(self, xc, s):
        """x_proj and dt_proj of one branch: (x, dt, A, B, C, D, dt_bias) for the scan."""
        _, x_proj, dt_proj, A_log, D = self._branch_params(s)
        cfg = self.cfg
        xc = self._q("x" + s, xc)
        dt, Bm, Cm = torch.split(x_proj(xc), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        if cfg.mixer_rms_eps is not None:     # FalconMamba
            dt, Bm, Cm = (weightless_rms_norm(t, cfg.mixer_rms_eps) for t in (dt, Bm, Cm))
            if cfg.inner_norm_weights:
                dt, Bm, Cm = (n.weight * t for n, t in ((self.dt_layernorm, dt), (self.b_layernorm, Bm),
                                                       (self.c_layernorm, Cm)))
        dt = F.linear(self._q("dt_low" + s, dt), dt_proj.weight)
        A = -torch.exp(at_least_fp32(A_log))
        return (xc, self._q("dt" + s, dt), A, self._q("B" + s, Bm), self._q("C" + s, Cm), at_least_fp32(D),
                at_least_fp32(dt_proj.bias))

    def _ssm(self, x, z, s, conv_state=None, ssm_state=None, return_state=False):
        """conv -> silu -> x_proj -> dt_proj -> selective scan (gated by z) for one direction."""
        conv = getattr(self, "conv1d" + s)
        xc, new_conv = causal_conv1d(self._q("conv1d" + s, x), conv.weight, conv.bias, conv_state)
        xc, dt, A, Bm, Cm, D, dt_bias = self._scan_inputs(F.silu(xc), s)
        out = selective_scan(xc, dt, A, Bm, Cm, D, z if self.gate_scale is None else None, delta_bias=dt_bias,
                             delta_softplus=True, initial_state=ssm_state, return_last_state=return_state)
        y, last = out if return_state else (out, None)
        if self.gate_scale is not None:
            y = y * self._gate(z)
        return (y, (new_conv, last)) if return_state else y

    def _gate(self, z):
        return z * torch.sigmoid(self.gate_scale * z)

    def forward(self, hidden, state=None, return_state=False):
        """hidden [b, L, d] -> [b, L, d]. state/return_state: (conv_state, ssm_state) of a causal mixer."""
        x, z = self.in_proj(self._q("in_proj", hidden)).chunk(2, dim=-1)
        z = self._q("z", z)
        if not self.cfg.bimamba:
            conv_state, ssm_state = state if state is not None else (None, None)
            out = self._ssm(x, z, "", conv_state, ssm_state, return_state)
            if return_state:
                y, new_state = out
                return self._out(y), new_state
            return self._out(out)
        if state is not None or return_state:
            raise MQUserError("the bidirectional mixer has no recurrent state")
        y_f = self._ssm(x, z, "")
        y_b = self._ssm(x.flip(1), z.flip(1), "_b").flip(1)
        return self._out((y_f + y_b) / 2)

    def _out(self, y):
        return self.out_proj(self._q("out_proj", self._rotate_out(y)))

    def step(self, hidden, conv_state, ssm_state):
        """One token. hidden [b, d]; conv_state [b, Di, K-1]; ssm_state [b, Di, N]."""
        if self.cfg.bimamba:
            raise MQUserError("the bidirectional mixer cannot decode step by step")
        x, z = self.in_proj(self._q("in_proj", hidden)).chunk(2, dim=-1)
        z = self._q("z", z)
        window = torch.cat([conv_state, self._q("conv1d", x).unsqueeze(-1)], dim=-1)       # [b, Di, K]
        xc = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc, dt, A, Bm, Cm, D, dt_bias = self._scan_inputs(F.silu(xc), "")
        y, new_ssm = selective_state_update(ssm_state, xc, dt, A, Bm, Cm, D, z if self.gate_scale is None else None,
                                            delta_bias=dt_bias, delta_softplus=True)
        if self.gate_scale is not None:
            y = y * self._gate(z)
        return self._out(y), window[..., 1:], new_ssm
