"""Zamba2 layers in PyTorch.

A Zamba2 layer is not a pre-norm residual block around one mixer: the shared transformer block reads the
raw residual stream h together with the token embeddings e, and its output T joins only the Mamba2 input,
h' = h + mamba(norm(h + T)). So the family brings its own Block (what MambaLM builds for its layers): the
block's `norm` is the Mamba2 input norm (what the recipes fuse, smooth and rotate, its readers in_proj), and
the mixer holds the children, each one of our families' modules with transformers' names: self_attn (q/k/v
read [h, e], 2 d_model wide; o_proj back to d_model), feed_forward (gate/up/down), linear (d_model ->
d_model, writes T onto the stream) and mamba. The mixer exposes their weights under the flat site names the
family declares and shares its quant hook with them."""

from __future__ import annotations

import torch
import torch.nn as nn

from mq_deploy.families.attention.mixer import Attention
from mq_deploy.families.mamba2.mixer import Mamba2Mixer
from mq_deploy.families.mlp.mixer import MLP
from mq_deploy.families.parallel.mixer import CompositeMixer
from mq_deploy.families.zamba2.config import Zamba2LayerConfig
from mq_deploy.models.layers import weightless_rms_norm
from mq_deploy.models.mamba import Block


class SharedAttention(Attention):
    """Attention over [h, e] (cfg.d_model = 2 d_model) whose o_proj writes d_model channels."""

    def __init__(self, cfg, d_out: int):
        super().__init__(cfg)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, d_out, bias=cfg.out_bias)


def _child(name: str, attr: str):
    def get(self):
        child = self._modules.get(name)
        return None if child is None else getattr(child, attr)
    return property(get)


class Zamba2Mixer(CompositeMixer):
    # the weight sites, as the family names them (fake quant, GPTQ and the exporter's scales find them by name)
    q_proj, k_proj, v_proj, o_proj = (_child("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    up_proj, gate_proj, down_proj = (_child("feed_forward", n) for n in ("up_proj", "gate_proj", "down_proj"))
    in_proj, conv1d, out_proj = (_child("mamba", n) for n in ("in_proj", "conv1d", "out_proj"))

    def __init__(self, cfg: Zamba2LayerConfig):
        super().__init__(cfg)
        self.mamba = Mamba2Mixer(cfg.mamba)
        if cfg.shared:
            self.self_attn = SharedAttention(cfg.attention, cfg.d_model)
            self.feed_forward = MLP(cfg.mlp)
            self.linear = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        else:
            self.self_attn = self.feed_forward = self.linear = None

    def children_mixers(self) -> tuple:
        return tuple(c for c in (self.self_attn, self.feed_forward, self.mamba) if c is not None)

    def readers(self) -> list:
        """The linears that read the block norm's output (the Mamba2 input norm)."""
        return self.mamba.readers()

    def stream_readers(self) -> list:
        """Linears whose input is residual-stream tensors side by side, [h, e] (each rotates with the stream)."""
        return self.self_attn.readers() if self.cfg.shared else []

    def writers(self) -> list:
        return ([self.linear] if self.cfg.shared else []) + [self.mamba.out_linear]

    @property
    def out_linear(self):
        """None: the layer has up to three output projections; each child carries its own online rotation
        (set by this family's recipe hooks, families/zamba2/folds.py)."""
        return None

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        for child in self.children_mixers():
            child.reset_parameters(generator=generator)
        if self.linear is not None:
            nn.init.normal_(self.linear.weight, 0.0, 0.02, generator=generator)

    def shared_forward(self, h, emb, state=None, return_state=False):
        """T = linear(mlp(norm(attention(norm([h, e]))))) [b, L, d]; with return_state also (key, value)."""
        eps = self.cfg.shared_norm_eps
        x = weightless_rms_norm(torch.cat([h, emb.to(h.dtype)], dim=-1), eps)
        a = self.self_attn(x, state, return_state)
        if return_state:
            a, kv = a
        t = self.feed_forward(weightless_rms_norm(a, eps))
        t = self.linear(self._q("linear", t))
        return (t, kv) if return_state else t

    def forward(self, hidden, state=None, return_state=False):
        raise TypeError("a Zamba2 layer reads the residual stream and the embeddings: call its Zamba2Block")

    def step(self, hidden, *states):
        raise TypeError("a Zamba2 layer reads the residual stream and the embeddings: call its Zamba2Block")


class Zamba2Block(Block):
    """h + mamba(norm(h + T)), T the shared block's output at this depth (0 where there is none)."""

    reads_embeddings = True

    def _mamba_input(self, h, emb, state, return_state):
        if not self.mixer.cfg.shared:
            return h, None
        t = self.mixer.shared_forward(h, emb, state, return_state)
        if return_state:
            t, kv = t
            return h + t, kv
        return h + t, None

    def forward(self, h, state=None, return_state=False, emb=None):
        ms = None if state is None else tuple(state[:2])
        at = None if state is None or not self.mixer.cfg.shared else tuple(state[2:])
        x, kv = self._mamba_input(h, emb, at, return_state)
        out = self.mixer.mamba(self.norm(x.to(self.norm.weight.dtype)), ms, return_state)
        if not return_state:
            return self._add(h, out)
        out, (conv, ssm) = out
        return self._add(h, out), (conv, ssm) + (kv if kv is not None else ())

    def step(self, h, *states, emb=None):
        x = h
        kv = ()
        if self.mixer.cfg.shared:
            t, (k, v) = self.mixer.shared_forward(h[:, None], emb[:, None], tuple(states[2:]), True)
            x, kv = h + t[:, 0], (k, v)
        out, conv, ssm = self.mixer.mamba.step(self.norm(x.to(self.norm.weight.dtype)), *states[:2])
        return (self._add(h, out), conv, ssm, *kv)


Mixer = Zamba2Mixer

__all__ = ["Mixer", "SharedAttention", "Zamba2Block", "Zamba2Mixer"]
