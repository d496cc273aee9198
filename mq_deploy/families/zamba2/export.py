"""Zamba2's ONNX emitter: a whole layer (emit_block; the layer is not a pre-norm residual block around one
mixer, see mixer.py), written with the attention, MLP and Mamba2 emitters on the layer's prefix, so their
points and weights keep the flat names the family declares (layers.i.mixer.q_proj, ...in_proj, ...)."""

from __future__ import annotations

import numpy as np

from mq_deploy.families.attention import export as attention
from mq_deploy.families.mamba2 import export as mamba2
from mq_deploy.families.mlp import export as mlp
from mq_deploy.models.points import weight_key

# step graphs: the Mamba2 part reads its layer of the stacked states unfused (Gather), since a layer's states
# mix stacked SSM states and a per-layer KV cache
FUSED_STEP = False


def emit_block(g, layer, prefix, h, emb, state=None):
    """h (the residual stream), emb (the token embeddings) -> (h + mamba(norm(h + T)), new states: conv, ssm and,
    where the shared block applies, present key and value). state: None (full graph) or (this layer's state
    tensors in the family's order, None)."""
    b, mixer = g.b, layer.mixer
    cfg = mixer.cfg
    ms = at = None
    if state is not None:
        tensors, _ = state
        ms, at = (tuple(tensors[:2]), None), ((tuple(tensors[2:]), None) if cfg.shared else None)
    x, kv = h, ()
    if cfg.shared:
        eps = cfg.shared_norm_eps
        cat = b.rms_norm(b.op("Concat", [h, emb], "shared_in", axis=-1), None, eps)
        a, kv = attention.emit(g, mixer.self_attn, prefix, cat, at)
        t, _ = mlp.emit(g, mixer.feed_forward, prefix, b.rms_norm(a, None, eps))
        t = g.linear(g.qdq(t, prefix + "linear"), mixer.linear, weight_key(prefix, "linear"))
        x = b.op("Add", [h, t], "shared_out")
    ym, (conv, ssm) = mamba2.emit(g, mixer.mamba, prefix, b.rms_norm(x, layer.norm), ms)
    if layer.residual_multiplier != 1.0:      # as Block._add (no Zamba2 checkpoint has one; our configs may)
        ym = b.op("Mul", [ym, b.f32(np.array(layer.residual_multiplier), "residual_multiplier")])
    return b.op("Add", [h, ym], "residual"), (conv, ssm) + tuple(kv)


def emit(g, mixer, prefix, h, state=None):
    raise TypeError("a Zamba2 layer reads the residual stream and the embeddings: emit_block writes it")


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    out = mamba2.functions(mixer_cfg.mamba, quantized, op_types, opset)
    if mixer_cfg.shared:
        out += attention.functions(mixer_cfg.attention, quantized, op_types, opset)
        out += mlp.functions(mixer_cfg.mlp, quantized, op_types, opset)
    return out


__all__ = ["FUSED_STEP", "emit", "emit_block", "functions"]
