"""The int8 KV cache option (`--kv-cache int8`): each attention layer's keys and values stored as int8 with one
static scale per key/value head, calibrated as the largest magnitude each head wrote on the calibration data.

Keys are taken after RoPE (what the cache holds). The cache is symmetric (zero point 0) and rounds as ONNX's
QuantizeLinear, so the PyTorch reference (Attention._kv_quantize) and the exported graph store the same bytes."""

from __future__ import annotations

import contextlib

import torch

from mq_deploy.errors import MQUserError

KV_BITS = 8


def attention_modules(model) -> list:
    """[(name, Attention)] of every attention block in `model`, nested ones included (Falcon-H1's parallel
    blocks, Zamba2's per-depth copies)."""
    from mq_deploy.calib.collect import resident_layers
    from mq_deploy.families.attention.mixer import Attention

    return [(f"layers.{i}.{n}", m) for i, layer in resident_layers(model) for n, m in layer.named_modules()
            if isinstance(m, Attention)]


@contextlib.contextmanager
def observe(model):
    """Within the block, every attention block records the largest |key| and |value| per head it computes;
    yields {name: tensor [2, kv_heads]} (filled as the model runs)."""
    amax, attached = {}, attention_modules(model)

    def observer_for(name):
        def obs(k, v):
            cur = torch.stack([k.detach().abs().amax(dim=(0, 2, 3)), v.detach().abs().amax(dim=(0, 2, 3))]).float()
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        return obs

    try:
        for name, m in attached:
            m.kv_observer = observer_for(name)
        yield amax
    finally:
        for _, m in attached:
            m.kv_observer = None


def set_int8(model, amax: dict) -> int:
    """Every attention block of `model` stores its cache as int8 with the scales of `amax` (observe's
    {name: [2, kv_heads]}). Returns the number of blocks."""
    from mq_deploy.ops.quant import scale_from_amax

    attached = attention_modules(model)
    if not attached:
        raise MQUserError("--kv-cache int8: the model has no attention layer, so no KV cache to store as int8")
    missing = [n for n, _ in attached if n not in amax]
    if missing:
        raise MQUserError(f"--kv-cache int8: calibration reached no key or value of {missing[0]}")
    for name, m in attached:
        # a head that wrote only zeros gets the smallest scale: its cache stays exactly zero
        m.set_kv_int8(scale_from_amax(amax[name], KV_BITS))
    return len(attached)


__all__ = ["KV_BITS", "attention_modules", "observe", "set_int8"]
