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
    proj = qkv = None
    if g.quant is None or g.scales(prefix + "in_proj", 1) == g.scales(prefix + "qkv", 1):
        # in_proj, q, k and v as one MatMul of the one quantized input (graph._Graph.linears: ONNX Runtime fuses
        # an int8 MatMul only for a QuantizeLinear with one reader, and merges the two equal ones the points
        # would write); the two points' scales agree with every observer that sees the same tensor alike
        from mq_deploy.models.points import weight_key

        x = g.qdq(h, prefix + "in_proj")
        proj, *qkv = g.linears(x, [(mixer.mamba.in_proj, weight_key(prefix, "in_proj"))]
                               + attention.projections(mixer.self_attn, prefix))
    ym, (conv, ssm) = mamba2.emit(g, mixer.mamba, prefix, h, ms, proj=proj)
    ya, (k, v) = attention.emit(g, mixer.self_attn, prefix, h, at, qkv=qkv)
    return g.b.op("Add", [ym, ya], "parallel_sum"), (conv, ssm, k, v)


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    return (mamba2.functions(mixer_cfg.mamba, quantized, op_types, opset)
            + attention.functions(mixer_cfg.attention, quantized, op_types, opset))


__all__ = ["FUSED_STEP", "emit", "functions"]
