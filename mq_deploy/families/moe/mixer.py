"""The mixture-of-experts block in PyTorch: the reference the exported graph is compared with.

The routed experts' weights are stacked, expert after expert, in one 2-D tensor per projection
(`Experts.weight` [experts * out, in], what transformers stores as [experts, out, in]), so every stage that
works on a linear's rows works on them unchanged: per-output-channel scales are per (expert, channel), the
residual rotation and norm fusion act on up/gate's columns, the online Hadamard on down's columns, GPTQ
rounds the rows (with one Hessian per point for every expert: `in`'s over all tokens, not only the tokens
routed to that expert; `down_proj`'s over every expert's routed tokens together: an approximation of
per-expert GPTQ). Only the residual rotation of down's *output* needs the experts apart (`writers()` gives a
[experts, d_model, d_ff] view of it).

Routing follows transformers: tokens grouped by expert, each expert's output times its routing weight,
summed with index_add_; the router reads the block norm's output in floating point (it is not a quant
point); the experts and the shared expert read it quantized (point `in`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mq_deploy.families.mlp.mixer import activation
from mq_deploy.families.moe.config import MoEConfig
from mq_deploy.models.layers import MixerBase, at_least_fp32
from mq_deploy.ops.hadamard import rotate


class Experts(nn.Module):
    """One projection of every routed expert: weight [n * out_features, in_features], expert e's rows
    e * out_features .. (e + 1) * out_features."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n * out_features, in_features))
        self.bias = None

    def expert(self, e: int):
        return self.weight[e * self.out_features:(e + 1) * self.out_features]

    def stacked(self):
        """[n, out, in] (a view)."""
        return self.weight.view(self.n, self.out_features, self.in_features)


class _StackedWriter:
    """What fold.rotate_linear_output sees of the experts' down projections: their weights as
    [experts, d_model, d_ff], so Q^T W rotates each expert's output."""

    def __init__(self, experts: Experts):
        self.weight = experts.stacked()
        self.bias = None


class MoE(MixerBase):
    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        d, n = cfg.d_model, cfg.n_experts
        self.router = nn.Linear(d, n, bias=False)
        if cfg.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(n))
        else:
            self.e_score_correction_bias = None
        self.up_proj = Experts(n, d, cfg.d_ff)
        self.gate_proj = Experts(n, d, cfg.d_ff) if cfg.gated else None
        self.down_proj = Experts(n, cfg.d_ff, d)
        s = cfg.shared_d_ff
        self.shared_up = nn.Linear(d, s, bias=cfg.shared_bias) if s else None
        self.shared_gate = nn.Linear(d, s, bias=cfg.shared_bias) if s and cfg.shared_gated else None
        self.shared_down = nn.Linear(s, d, bias=cfg.shared_bias) if s else None
        # the online Hadamard before shared_down (families.moe.folds.rotate_shared_down); saved with the weights
        self.register_buffer("shared_rotation", None)

    # -- what the recipes ask ------------------------------------------------------------------------
    def readers(self) -> list:
        # the router reads the same normalised stream: the residual rotation and norm fusion fold into it too
        lins = [self.router, self.up_proj] + ([self.gate_proj] if self.gate_proj is not None else [])
        return lins + [m for m in (self.shared_up, self.shared_gate) if m is not None]

    def writers(self) -> list:
        return [_StackedWriter(self.down_proj)] + ([self.shared_down] if self.shared_down is not None else [])

    @property
    def out_linear(self):
        return self.down_proj

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        for m in [self.router, self.up_proj, self.gate_proj, self.down_proj, self.shared_up, self.shared_gate,
                  self.shared_down]:
            if m is not None:
                nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    # -- routing -------------------------------------------------------------------------------------
    def route(self, h):
        """h [tokens, d] -> (weights [tokens, k] in h's dtype, expert indices [tokens, k])."""
        cfg = self.cfg
        logits = at_least_fp32(self.router(h))
        if cfg.router == "softmax":
            w, idx = torch.topk(torch.softmax(logits, dim=-1), cfg.top_k, dim=-1)
        elif cfg.router == "topk_softmax":
            top, idx = torch.topk(logits, cfg.top_k, dim=-1)
            w = torch.softmax(top, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
            if cfg.n_group > 1:
                g = choice.view(-1, cfg.n_group, cfg.n_experts // cfg.n_group)
                group_scores = g.topk(2, dim=-1)[0].sum(-1)
                keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(cfg.topk_group, dim=-1)[1], 1.0)
                keep = keep.bool()[:, :, None].expand_as(g).reshape(choice.shape)
                choice = choice.masked_fill(~keep, float("-inf"))
            idx = torch.topk(choice, cfg.top_k, dim=-1)[1]
            w = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            w = w * cfg.routed_scaling_factor
        return w.to(h.dtype), idx

    # -- the block -------------------------------------------------------------------------------------
    def _expert(self, e: int, x):
        up = x @ self.up_proj.expert(e).t()
        if self.gate_proj is not None:
            y = activation(self.cfg.act, x @ self.gate_proj.expert(e).t()) * up
        else:
            y = activation(self.cfg.act, up)
        return self._q("down_proj", self._rotate_out(y)) @ self.down_proj.expert(e).t()

    def _shared(self, x):
        cfg = self.cfg
        if self.shared_gate is not None:
            y = activation(cfg.shared_act, self.shared_gate(x)) * self.shared_up(x)
        else:
            y = activation(cfg.shared_act, self.shared_up(x))
        if self.shared_rotation is not None:
            y = rotate(y, self.shared_rotation)
        return self.shared_down(self._q("shared_down", y))

    def forward(self, hidden, state=None, return_state=False):
        shape = hidden.shape
        h = hidden.reshape(-1, shape[-1])
        w, idx = self.route(h)
        x = self._q("in", h)
        out = torch.zeros_like(h)
        for e in torch.unique(idx).tolist():
            tok, pos = torch.where(idx == e)
            out.index_add_(0, tok, self._expert(e, x[tok]) * w[tok, pos, None])
        if self.shared_down is not None:
            out = out + self._shared(x)
        out = out.reshape(shape)
        return (out, ()) if return_state else out

    def step(self, hidden):
        return (self.forward(hidden[:, None])[:, 0],)
