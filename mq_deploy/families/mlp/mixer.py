"""The MLP block of hybrids in PyTorch (transformers' names: up_proj, gate_proj, down_proj)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mq_deploy.families.mlp.config import MLPConfig
from mq_deploy.models.layers import MixerBase


def activation(name: str, x):
    if name == "relu2":
        return torch.square(F.relu(x))
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    return F.relu(x)


class MLP(MixerBase):
    def __init__(self, cfg: MLPConfig):
        super().__init__(cfg)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.gated else None
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def readers(self) -> list:
        return [self.up_proj] + ([self.gate_proj] if self.gate_proj is not None else [])

    @property
    def out_linear(self):
        return self.down_proj

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        for lin in self.readers() + [self.down_proj]:
            nn.init.normal_(lin.weight, 0.0, 0.02, generator=generator)
            if lin.bias is not None:
                lin.bias.zero_()

    def forward(self, hidden, state=None, return_state=False):
        x = self._q("in", hidden)
        if self.gate_proj is not None:
            y = activation(self.cfg.act, self.gate_proj(x)) * self.up_proj(x)
        else:
            y = activation(self.cfg.act, self.up_proj(x))
        out = self.down_proj(self._q("down_proj", self._rotate_out(y)))
        return (out, ()) if return_state else out

    def step(self, hidden):
        return (self.forward(hidden[:, None])[:, 0],)
