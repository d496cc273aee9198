"""Vision Mamba (hustvl/Vim "bimamba v2"): patch embedding, class token in the middle of the sequence,
absolute position embedding, bidirectional mixers (outputs averaged), head on the class token."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mq_deploy.config import VimConfig
from mq_deploy.errors import MQUserError
from mq_deploy.models.layers import RMSNorm
from mq_deploy.models.mamba import Block, init_weights


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(cfg.in_chans, cfg.d_model, cfg.patch_size, stride=cfg.stride)

    def forward(self, images):
        c = self.cfg
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise MQUserError(f"images must be [b, {c.in_chans}, {c.img_size}, {c.img_size}], "
                             f"got {tuple(images.shape)}")
        return self.proj(images).flatten(2).transpose(1, 2)            # [b, M, d]


class Vim(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.d_model))
        self.layers = nn.ModuleList(Block(m, cfg.norm_eps, cfg.residual_in_fp32) for m in cfg.layer_configs())
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    @property
    def token_position(self) -> int:
        return self.cfg.num_patches // 2

    def reset_parameters(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        init_weights(self, self.cfg.n_layer, g)
        with torch.no_grad():
            self.pos_embed.normal_(0.0, 0.02, generator=g)
            self.cls_token.normal_(0.0, 0.02, generator=g)
            w = self.patch_embed.proj.weight
            bound = 1 / math.sqrt(w[0].numel())
            w.uniform_(-bound, bound, generator=g)
            self.patch_embed.proj.bias.zero_()
            self.head.weight.normal_(0.0, 0.02, generator=g)
            self.head.bias.zero_()

    def tokens(self, images):
        x = self.patch_embed(images)
        p = self.token_position
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x[:, :p], cls, x[:, p:]], dim=1) + self.pos_embed

    def forward_features(self, images):
        h = self.tokens(images)
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h.to(self.norm_f.weight.dtype))[:, self.token_position]

    def forward(self, images):
        """images [b, C, H, W] (normalised) -> logits [b, num_classes]."""
        return self.head(self.forward_features(images))
