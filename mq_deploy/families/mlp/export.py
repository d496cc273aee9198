"""The MLP block's ONNX emitter."""

from __future__ import annotations

from mq_deploy.models.points import weight_key

FUSED_STEP = False


def _act(b, name, x):
    if name == "relu2":
        r = b.op("Relu", [x])
        return b.op("Mul", [r, r])
    if name == "silu":
        return b.silu(x)
    if name == "gelu":
        return b.op("Gelu", [x])
    return b.op("Relu", [x])


def emit(g, mixer, prefix, h, state=None):
    b, cfg = g.b, mixer.cfg
    x = g.qdq(h, prefix + "in")
    if mixer.gate_proj is not None:      # one MatMul for both (graph._Graph.linears)
        up, gate = g.linears(x, [(mixer.up_proj, weight_key(prefix, "up_proj")),
                                 (mixer.gate_proj, weight_key(prefix, "gate_proj"))])
        y = b.op("Mul", [_act(b, cfg.act, gate), up])
    else:
        y = _act(b, cfg.act, g.linear(x, mixer.up_proj, weight_key(prefix, "up_proj")))
    if mixer.out_rotation is not None:
        y = g.online_rotation(y, mixer.out_rotation)
    return g.linear(g.qdq(y, prefix + "down_proj"), mixer.down_proj, weight_key(prefix, "down_proj")), ()


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    return []
