"""Fake quantization of a Mamba / Vim model at DESIGN §3's quant points.

Weights (per output channel, symmetric) of in_proj, conv1d, x_proj, dt_proj, out_proj (and the Vim
backward branch's conv1d_b, x_proj_b, dt_proj_b) are replaced by their dequantized values; the
integer scales are kept for export. Activations at every point of MambaMixer.QUANT_POINTS are
rounded by the mixer's act_hook with static per-tensor scales from calibration, or per token at
run time. Embeddings, norms, heads, A, D and the dt bias stay floating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mq_deploy.calib.collect import mixers
from mq_deploy.errors import MQUserError
from mq_deploy.ops.quant import fake_quantize, qmax, scale_from_amax, weight_scales

WEIGHT_SITES = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")


@dataclass
class QuantConfig:
    wbits: int = 8
    abits: int = 8
    act_granularity: str = "per_tensor"   # "per_tensor" (static, calibrated) or "per_token" (dynamic)

    def __post_init__(self):
        if self.wbits not in (4, 8):
            raise MQUserError(f"wbits must be 4 or 8, got {self.wbits}")
        if self.abits not in (4, 6, 8, 16):
            # 6 and 4 are fake-quant evaluation only: export (the int8 scan) takes A8
            raise MQUserError(f"abits must be 8, or 6 / 4 for fake-quant evaluation (16 leaves activations nearly "
                              f"exact), got {self.abits}")
        if self.act_granularity not in ("per_tensor", "per_token"):
            raise MQUserError(f"act_granularity must be per_tensor or per_token, got {self.act_granularity!r}")


def weight_modules(mixer):
    """(site name, module) of every quantized weight of one mixer."""
    out = []
    for site in WEIGHT_SITES:
        for suffix in ("", "_b") if site in ("conv1d", "x_proj", "dt_proj") else ("",):
            mod = getattr(mixer, site + suffix, None)
            if mod is not None:
                out.append((site + suffix, mod))
    return out


@torch.no_grad()
def quantize_weights(model, bits: int) -> dict:
    """Round every quantized weight in place; return {param name: per-channel scale}."""
    scales = {}
    for prefix, mixer in mixers(model):
        for site, mod in weight_modules(mixer):
            s = weight_scales(mod.weight, bits)
            mod.weight.copy_(fake_quantize(mod.weight, s, bits, axis=0))
            scales[f"{prefix}{site}.weight"] = s
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
            return fake_quantize(t, s, cfg.abits, full_range=True)   # as QuantizeLinear saturates
        mixer.act_hook = hook


def scales_from_observers(observers: dict, bits: int) -> dict:
    """{point: per-tensor scale} from each point's first observer with an amax (MinMax or Percentile)."""
    out = {}
    for name, obs_list in observers.items():
        obs = next(o for o in obs_list if hasattr(o, "amax"))
        out[name] = scale_from_amax(obs.amax(), bits)
    return out
