"""The parallel block's ONNX emitter: the Mamba2 and attention emitters on the same normalised input, their
outputs added. Both are given the block's prefix, so their points and weights keep the flat names the
family declares (layers.i.mixer.in_proj, layers.i.mixer.qkv, ...)."""

from __future__ import annotations

from mq_deploy.families.attention import export as attention
from mq_deploy.families.mamba2 import export as mamba2

# step graphs: the Mamba2 part reads its layer of the stacked states unfused (Gather), since the block's
# states mix stacked SSM states and a per-layer KV cache
FUSED_STEP = False


def emit(g, mixer, prefix, h, state=None):
    """h (the block norm's output) -> (sum of both outputs, (conv, ssm, present key, present value)).
    state: None (full graph) or ((conv_state, ssm_state, past_key, past_value), None) of this layer."""
    ms = at = None
    if state is not None:
        tensors, _ = state
        ms, at = (tuple(tensors[:2]), None), (tuple(tensors[2:]), None)
    ym, (conv, ssm) = mamba2.emit(g, mixer.mamba, prefix, h, ms)
    ya, (k, v) = attention.emit(g, mixer.self_attn, prefix, h, at)
    return g.b.op("Add", [ym, ya], "parallel_sum"), (conv, ssm, k, v)


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    return (mamba2.functions(mixer_cfg.mamba, quantized, op_types, opset)
            + attention.functions(mixer_cfg.attention, quantized, op_types, opset))


__all__ = ["FUSED_STEP", "emit", "functions"]
