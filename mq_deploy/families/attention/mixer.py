"""Causal grouped-query attention with a KV cache, as hybrids' attention layers compute it (transformers'
eager attention: scores in float32, softmax, then values)."""

from __future__ import annotations

import torch
import torch.nn as nn

from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.models.layers import MixerBase


def rope_tables(positions: torch.Tensor, rope_dim: int, theta: float, dtype=torch.float32):
    """(cos, sin) [L, rope_dim] of transformers' rotary embedding (frequencies repeated as [f, f])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin, rope_dim: int):
    """x [b, heads, L, head_dim]: its first rope_dim dimensions rotated (rotate-half pairing)."""
    if rope_dim == 0:
        return x
    xr, rest = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, rest], dim=-1)


class Attention(MixerBase):
    def __init__(self, cfg: AttentionConfig):
        super().__init__(cfg)
        H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, K * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, K * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, cfg.d_model, bias=cfg.out_bias)
        # calibration: kv_observer(k, v) sees each new key and value [b, kv_heads, L, head_dim] (after RoPE)
        self.kv_observer = None
        if cfg.kv_cache == "int8":
            self.register_buffer("kv_scale", torch.ones(2, K))     # the key's and the value's scale per head

    @torch.no_grad()
    def set_kv_int8(self, scale: torch.Tensor) -> None:
        """Store the cache as int8 from now on: scale [2, kv_heads], the key's and value's per head (finite, > 0).
        Sets cfg.kv_cache, so the model's states (StateSpec.dtype) and its saved config say int8."""
        K = self.cfg.n_kv_heads
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if tuple(scale.shape) != (2, K) or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise MQUserError(f"KV cache scales must be finite, > 0 and [2, {K}], got {list(scale.shape)}")
        self.cfg.kv_cache = "int8"
        if "kv_scale" in self._buffers:
            self.kv_scale.copy_(scale)
        else:
            self.register_buffer("kv_scale", scale.clone())

    def _kv_quantize(self, t, which: int):
        """t [b, kv_heads, L, hd] -> int8 as ONNX's QuantizeLinear (round half to even, saturate), scale per head."""
        s = self.kv_scale[which].view(1, -1, 1, 1)
        return torch.clamp(torch.round(t / s), -128, 127).to(torch.int8)

    def _kv_dequantize(self, q, which: int):
        return q.to(torch.float32) * self.kv_scale[which].view(1, -1, 1, 1)

    def readers(self) -> list:
        return [self.q_proj, self.k_proj, self.v_proj]

    @property
    def out_linear(self):
        return self.o_proj

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, 0.0, 0.02, generator=generator)
            if lin.bias is not None:
                lin.bias.zero_()

    def forward(self, hidden, state=None, return_state=False):
        """hidden [b, L, d] -> [b, L, d]. state/return_state: (past_key, past_value) [b, kv_heads, T, head_dim]."""
        cfg = self.cfg
        b, L, _ = hidden.shape
        past_k, past_v = state if state is not None else (None, None)
        T = 0 if past_k is None else past_k.shape[2]
        if cfg.max_positions is not None and T + L > cfg.max_positions:
            raise MQUserError(f"{T + L} positions exceed the model's limit of {cfg.max_positions} "
                              "(max_position_embeddings)")
        x = self._q("qkv", hidden)
        q = self.q_proj(x).view(b, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.rope_dim:
            cos, sin = rope_tables(torch.arange(T, T + L), cfg.rope_dim, cfg.rope_theta, q.dtype)
            q, k = apply_rope(q, cos, sin, cfg.rope_dim), apply_rope(k, cos, sin, cfg.rope_dim)
        if self.kv_observer is not None:
            self.kv_observer(k, v)
        if cfg.kv_cache == "int8":         # the cache holds int8; attention reads its dequantized values
            k, v = self._kv_quantize(k, 0), self._kv_quantize(v, 1)
            if past_k is not None:
                if past_k.dtype != torch.int8 or past_v.dtype != torch.int8:
                    raise MQUserError(f"this layer's KV cache is int8, got {past_k.dtype} / {past_v.dtype}")
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            cache = (k, v)
            k, v = self._kv_dequantize(k, 0).to(q.dtype), self._kv_dequantize(v, 1).to(q.dtype)
        else:
            if past_k is not None:
                k, v = torch.cat([past_k.to(k.dtype), k], dim=2), torch.cat([past_v.to(v.dtype), v], dim=2)
            cache = (k, v)
        rep = cfg.n_heads // cfg.n_kv_heads
        kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, kr.transpose(2, 3)) * cfg.score_scale              # [b, H, L, T+L]
        visible = torch.ones(L, T + L, dtype=torch.bool).tril(diagonal=T)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        y = torch.matmul(probs, vr).transpose(1, 2).reshape(b, L, cfg.n_heads * cfg.head_dim)
        out = self.o_proj(self._q("o_proj", self._rotate_out(y)))
        return (out, cache) if return_state else out

    def step(self, hidden, past_key, past_value):
        out, (k, v) = self.forward(hidden[:, None], (past_key, past_value), return_state=True)
        return out[:, 0], k, v
