"""Fake quantization at the quant points each mixer family declares (mq_deploy.families).

Weights (per output channel, symmetric) of the family's weight sites (Mamba1: in_proj, conv1d, x_proj,
dt_proj, out_proj, and the Vim backward branch's conv1d_b, x_proj_b, dt_proj_b) are replaced by their
dequantized values; the integer scales are kept for export. Activations at every quant point are
rounded by the mixer's act_hook with static per-tensor scales from calibration, or per token at
run time. Embeddings, norms, heads, A, D and the dt bias stay floating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mq_deploy.calib.collect import mixers
from mq_deploy.errors import MQUserError
from mq_deploy.models.points import weight_key
from mq_deploy.ops.quant import fake_quantize, qmax, scale_from_amax, weight_scales

SSM_SCALES = ("per_tensor", "grouped")


def channel_scales(s: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-tensor scale (0-d or one value) as it is, a per-group vector [G] expanded to [channels]."""
    if s.numel() == 1:
        return s.reshape(())
    if channels % s.numel():
        raise MQUserError(f"{channels} channels are not a multiple of {s.numel()} scale groups")
    return s.reshape(-1).repeat_interleave(channels // s.numel())


@dataclass
class QuantConfig:
    wbits: int = 8
    abits: int = 8
    act_granularity: str = "per_tensor"   # "per_tensor" (static, calibrated) or "per_token" (dynamic)
    # static scales of the scan's inputs: one per tensor, or "grouped": one per group of channels where the
    # family declares groups (Mamba2: x and dt per head, B and C per SSD group; Family.scale_groups)
    ssm_scales: str = "per_tensor"
    # attention layers' KV caches: "fp32", or "int8" with a static scale per key/value head
    # (mq_deploy.families.attention.kv; AttentionConfig.kv_cache)
    kv_cache: str = "fp32"

    def __post_init__(self):
        if self.wbits not in (4, 8):
            raise MQUserError(f"wbits must be 4 or 8, got {self.wbits}")
        if self.abits not in (4, 6, 8, 16):
            # 6 and 4 are fake-quant evaluation only: export (the int8 scan) takes A8
            raise MQUserError(f"abits must be 8, or 6 / 4 for fake-quant evaluation (16 leaves activations nearly "
                              f"exact), got {self.abits}")
        if self.act_granularity not in ("per_tensor", "per_token"):
            raise MQUserError(f"act_granularity must be per_tensor or per_token, got {self.act_granularity!r}")
        if self.ssm_scales not in SSM_SCALES:
            raise MQUserError(f"ssm_scales must be one of {', '.join(SSM_SCALES)}, got {self.ssm_scales!r}")
        from mq_deploy.families.attention.config import KV_CACHE

        if self.kv_cache not in KV_CACHE:
            raise MQUserError(f"kv_cache must be one of {', '.join(KV_CACHE)}, got {self.kv_cache!r}")


@torch.no_grad()
def quantize_weights(model, bits: int) -> dict:
    """Round every quantized weight in place; return {param name: per-channel scale}."""
    scales = {}
    for prefix, mixer in mixers(model):
        for site, mod in mixer.weight_modules():
            s = weight_scales(mod.weight, bits)
            mod.weight.copy_(fake_quantize(mod.weight, s, bits, axis=0))
            scales[weight_key(prefix, site)] = s
    return scales


def _per_token_hook(bits):
    q = qmax(bits)

    def hook(name, t):
        s = t.detach().abs().amax(-1, keepdim=True).clamp_min(1e-12) / q
        return torch.clamp(torch.round(t / s), -q, q) * s
    return hook


def attach_activation_quant(model, act_scales: dict | None, cfg: QuantConfig) -> None:
    """Set each mixer's act_hook: static scales from `act_scales` {point name: scale}, or per token."""
    for prefix, mixer in mixers(model):
        if cfg.act_granularity == "per_token":
            mixer.act_hook = _per_token_hook(cfg.abits)
            continue

        def hook(name, t, prefix=prefix):
            s = act_scales.get(prefix + name)
            if s is None:
                raise MQUserError(f"no calibrated scale for quant point {prefix + name}")
            return fake_quantize(t, channel_scales(s, t.shape[-1]), cfg.abits, full_range=True)   # as QuantizeLinear
        mixer.act_hook = hook


def scales_from_observers(observers: dict, bits: int) -> dict:
    """{point: per-tensor scale} from each point's first observer with an amax (MinMax or Percentile)."""
    out = {}
    for name, obs_list in observers.items():
        obs = next(o for o in obs_list if hasattr(o, "amax"))
        out[name] = scale_from_amax(obs.amax(), bits)
    return out


# ---- int8 LM head (--quantize-head) ------------------------------------------------------------------

HEAD_ACTS = ("dynamic", "none")


def dynamic_quantize_linear_ref(x: torch.Tensor):
    """ONNX DynamicQuantizeLinear: uint8 codes, per-tensor scale and zero point of the whole tensor
    (range widened to include 0, scale = range / 255, round half to even, saturate)."""
    x = x.to(torch.float32)
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return q, scale, zp


class Int8Head(torch.nn.Module):
    """LM head with int8 per-output-channel weights (symmetric, RTN) and, with act="dynamic", its input
    quantized per tensor at run time as ONNX DynamicQuantizeLinear does: the reference of the exported
    int8 head (DynamicQuantizeLinear -> MatMulInteger -> scale). Holds its own weight, so a tied
    embedding stays float."""

    def __init__(self, weight: torch.Tensor, act: str = "dynamic"):
        super().__init__()
        if act not in HEAD_ACTS:
            raise MQUserError(f"head activations must be one of {', '.join(HEAD_ACTS)}, got {act!r}")
        self.act = act
        w = weight.detach().to(torch.float32)
        s = weight_scales(w, 8)
        self.register_buffer("qweight", torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8))
        self.register_buffer("scale", s)
        self.out_features, self.in_features = w.shape

    def forward(self, x):
        w = self.qweight.to(torch.float64) * self.scale.to(torch.float64)[:, None]
        if self.act == "dynamic":
            q, s, zp = dynamic_quantize_linear_ref(x)
            x = (q - zp).to(torch.float64) * s.to(torch.float64)
        return (x.to(torch.float64) @ w.t()).to(torch.float32)


class Int4Head(torch.nn.Module):
    """LM head with int4 weights, symmetric, RTN, one scale per block of `block` inputs of each output channel
    (llama.cpp's Q4_0 granularity; one scale per channel would be too coarse for a vocabulary-sized head), and
    float activations: the reference of the exported int4 head (com.microsoft.MatMulNBits, or a blocked int4
    DequantizeLinear -> MatMul for TensorRT). Holds its own weight, so a tied embedding stays float."""

    def __init__(self, weight: torch.Tensor, block: int = 32):
        super().__init__()
        w = weight.detach().to(torch.float32)
        self.out_features, self.in_features = w.shape
        self.block = block
        nb = -(-self.in_features // block)
        wp = torch.nn.functional.pad(w, (0, nb * block - self.in_features)).reshape(self.out_features, nb, block)
        s = (wp.abs().amax(-1) / 7.0).clamp_min(torch.finfo(torch.float32).tiny)       # [V, blocks]
        q = torch.clamp(torch.round(wp / s[..., None]), -7, 7).reshape(self.out_features, -1)[:, :self.in_features]
        self.register_buffer("qweight", q.to(torch.int8))
        self.register_buffer("scale", s)

    def forward(self, x):
        s = self.scale.to(torch.float64).repeat_interleave(self.block, 1)[:, :self.in_features]
        return (x.to(torch.float64) @ (self.qweight.to(torch.float64) * s).t()).to(torch.float32)


HEAD_BITS = (8, 4)


def quantize_head(model, act: str = "dynamic", bits: int = 8) -> torch.nn.Module:
    """Replace an LM's lm_head by its int8 form (Int8Head) or, bits 4, its int4 form (Int4Head: float
    activations, `act` unused); the embedding is left as it is."""
    if bits not in HEAD_BITS:
        raise MQUserError(f"the head takes {' or '.join(map(str, HEAD_BITS))}-bit weights, not {bits!r}")
    head = getattr(model, "lm_head", None)
    if head is None:
        raise MQUserError("--quantize-head applies to language models (a model with an lm_head)")
    kind = Int8Head if bits == 8 else Int4Head
    if isinstance(head, kind):
        return head
    if isinstance(head, (Int8Head, Int4Head)):
        raise MQUserError(f"the LM head is already quantized ({type(head).__name__})")
    model.lm_head = Int8Head(head.weight, act) if bits == 8 else Int4Head(head.weight)
    return model.lm_head
