"""Our PyTorch Mamba1: mixer, pre-norm residual block, causal LM, with step-wise decoding.

Parameter names follow mamba-ssm (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj; the Vim
backward branch adds conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b) so the loaders only rename prefixes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mq_deploy.config import MambaLMConfig, MixerConfig
from mq_deploy.errors import MQUserError
from mq_deploy.ops.selective_scan import selective_scan, selective_state_update


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
    """FalconMamba's norm of dt, B and C: x / rms(x) over the last axis, computed in at least fp32."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _at_least_fp32(t):
    """SSM parameters (A, D, dt bias) are kept in fp32 for half-precision models, as in mamba-ssm."""
    return t if t.dtype == torch.float64 else t.float()


def causal_conv1d(x, weight, bias=None, conv_state=None):
    """Depthwise causal conv in channels-last layout. x [b, L, Di]; weight [Di, 1, K].

    conv_state [b, Di, K-1] holds the inputs before x (zeros when None). Returns (y, new_conv_state).
    """
    k = weight.shape[-1]
    bsz, seqlen, dim = x.shape
    prev = (x.new_zeros(bsz, k - 1, dim) if conv_state is None else conv_state.transpose(1, 2).to(x.dtype))
    xp = torch.cat([prev, x], dim=1)                               # [b, L+K-1, Di]
    w = weight[:, 0, :].t()                                        # [K, Di]
    y = xp[:, k - 1:] * w[k - 1]
    for j in range(k - 1):
        y = y + xp[:, j:j + seqlen] * w[j]
    if bias is not None:
        y = y + bias
    return y, xp[:, seqlen:].transpose(1, 2)


class MambaMixer(nn.Module):
    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.cfg = cfg
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
        # optional online rotation of out_proj's input (transforms.fold.set_online_out_rotation)
        self.register_buffer("out_rotation", None)
        # optional smoothing fused into the gate: z * sigmoid(gate_scale * z) instead of silu(z)
        # (transforms.fold.smooth_out_proj_into_gate)
        self.register_buffer("gate_scale", None)
        self.act_hook = None

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

    # Activation quant points, named per branch (suffix "_b" for Vim's backward scan):
    #   in_proj (its input), conv1d (its input), x (conv output after silu: input of x_proj and of the
    #   scan), dt_low (input of dt_proj), dt, B, C (scan inputs), z (the gate), out_proj (its input).
    # `act_hook(name, tensor) -> tensor` sees each of them: calibration observes, fake-quant rounds.
    QUANT_POINTS = ("in_proj", "conv1d", "x", "dt_low", "dt", "B", "C", "z", "out_proj")

    def _q(self, name, t):
        return t if self.act_hook is None else self.act_hook(name, t)

    def _scan_inputs(self, xc, s):
        """x_proj and dt_proj of one branch: (x, dt, A, B, C, D, dt_bias) for the scan."""
        _, x_proj, dt_proj, A_log, D = self._branch_params(s)
        cfg = self.cfg
        xc = self._q("x" + s, xc)
        dt, Bm, Cm = torch.split(x_proj(xc), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        if cfg.mixer_rms_eps is not None:     # FalconMamba
            dt, Bm, Cm = (weightless_rms_norm(t, cfg.mixer_rms_eps) for t in (dt, Bm, Cm))
        dt = F.linear(self._q("dt_low" + s, dt), dt_proj.weight)
        A = -torch.exp(_at_least_fp32(A_log))
        return (xc, self._q("dt" + s, dt), A, self._q("B" + s, Bm), self._q("C" + s, Cm), _at_least_fp32(D),
                _at_least_fp32(dt_proj.bias))

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
        if self.out_rotation is not None:
            y = y @ self.out_rotation
        return self.out_proj(self._q("out_proj", y))

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


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)); the residual stream stays fp32 if asked."""

    def __init__(self, mixer_cfg: MixerConfig, norm_eps: float, residual_in_fp32: bool):
        super().__init__()
        self.norm = RMSNorm(mixer_cfg.d_model, norm_eps)
        self.mixer = MambaMixer(mixer_cfg)
        self.residual_in_fp32 = residual_in_fp32

    def _residual(self, h):
        return _at_least_fp32(h) if self.residual_in_fp32 else h

    def forward(self, h, state=None, return_state=False):
        out = self.mixer(self.norm(h.to(self.norm.weight.dtype)), state, return_state)
        if return_state:
            out, new_state = out
            return self._residual(h) + out, new_state
        return self._residual(h) + out

    def step(self, h, conv_state, ssm_state):
        out, conv_state, ssm_state = self.mixer.step(self.norm(h.to(self.norm.weight.dtype)), conv_state,
                                                     ssm_state)
        return self._residual(h) + out, conv_state, ssm_state


def init_weights(model: nn.Module, n_layer: int, generator=None):
    """mamba-ssm's _init_weights: N(0, 0.02) embeddings, zero linear biases, out_proj scaled 1/sqrt(n_layer)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("dt_proj") and not name.endswith("dt_proj_b"):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
                if name.endswith("out_proj"):
                    m.weight /= math.sqrt(n_layer)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(m, MambaMixer):
                m.reset_parameters(generator=generator)


class MambaLM(nn.Module):
    """Causal LM: embedding, n_layer blocks, final RMSNorm, lm_head (tied or untied)."""

    def __init__(self, cfg: MambaLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg.mixer, cfg.norm_eps, cfg.residual_in_fp32) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def reset_parameters(self, seed: int = 0):
        init_weights(self, self.cfg.n_layer, torch.Generator().manual_seed(seed))

    def _head(self, h):
        return self.lm_head(self.norm_f(h.to(self.norm_f.weight.dtype)))

    def backbone(self, input_ids):
        """Hidden states before norm_f and the head (what calibration needs; skips the vocab matmul)."""
        h = self.embedding(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, input_ids, return_state=False, state=None):
        """input_ids [b, L] -> logits [b, L, V]; with return_state also the per-layer decode cache.

        state: per-layer (conv_state, ssm_state) to continue from (as init_state / return_state give)."""
        h = self.embedding(input_ids)
        states = []
        for i, layer in enumerate(self.layers):
            st = None if state is None else state[i]
            if return_state:
                h, st = layer(h, st, return_state=True)
                states.append(st)
            else:
                h = layer(h, st)
        logits = self._head(h)
        return (logits, states) if return_state else logits

    def init_state(self, batch: int, dtype=torch.float32, device=None):
        m = self.cfg.mixer
        return [(torch.zeros(batch, m.d_inner, m.d_conv - 1, dtype=dtype, device=device),
                 torch.zeros(batch, m.d_inner, m.d_state, dtype=dtype, device=device))
                for _ in range(self.cfg.n_layer)]

    def step(self, token, states):
        """token [b] -> (logits [b, V], new states)."""
        h = self.embedding(token)
        new = []
        for layer, (cs, ss) in zip(self.layers, states):
            h, cs, ss = layer.step(h, cs, ss)
            new.append((cs, ss))
        return self._head(h), new

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, generator=None):
        """Greedy (temperature 0) or sampled continuation; prefill with the full-sequence path."""
        logits, states = self(input_ids, return_state=True)
        last = logits[:, -1]
        out = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                tok = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator)[:, 0]
            else:
                tok = last.argmax(-1)
            out.append(tok)
            last, states = self.step(tok, states)
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(input_ids.shape[0], 0)
