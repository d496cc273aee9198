"""mq::SSDStateUpdate and mq::SSDStateUpdateFloat: a Mamba2 mixer's conv over x|B|C and its SSD scan for
L >= 1 tokens that continue from the decode states, as one op of the decode-step graph.

Between in_proj and the gated norm, the unfused step graph runs per layer a Gather of each state, the
conv-state Concat/Slice, Transpose, Conv, SiLU, Split and four quant points around mq::SSDScan. The native
kernel (libmq_scan_ort.so) does them in one call; the function body below is the same computation in
standard ops plus mq::SSDScan, so the graph runs unchanged without the library and is the kernel's
reference.

    mq::SSDStateUpdate (domain "mq", version 1)
    inputs   0 xbc         float [b, L, Cd]          in_proj's x|B|C part (Cd = H*P + 2*G*N), before the conv
             1 dt          int8  [b, L, H]           in_proj's dt after its QuantizeLinear (before its bias)
             2 conv_state  float [n_layer, b, Cd, K-1]   every layer's last K-1 conv inputs (after the conv1d
                                 quant point): the step graph's stacked input; the op reads conv_state[layer]
             3 ssm_state   float [n_layer, b, H, P, N]   likewise, ssm_state[layer]
             4 conv_w      float [Cd, K]             the dequantized int8 conv weights (q * scale)
             5 conv_b      float [Cd]
             6 A           float [H]                 -exp(A_log)
             7 D           float [H]
             8 dt_bias     float [H]
    outputs  0 y           float [b, L, H*P]         scan + D x (the gate is the gated norm's, after the op)
             1 conv_state_out float [b, Cd, K-1]
             2 ssm_state_out  float [b, H, P, N]
    attributes layer (int); heads, head_dim, groups, d_state, chunk, dt_min, dt_max (as mq::SSDScan);
             conv_scale (float, per tensor); x_scale, dt_scale, B_scale, C_scale (floats, as mq::SSDScan's)

    xin = qdq(xbc, conv_scale); seq = [conv_state[layer] | xin] along time; conv_state_out = its last K-1
    x, B, C = split(silu(conv(seq) + conv_b)) ; each quantized: round(v / scale) clipped to [-128, 127]
    y, ssm_state_out = mq::SSDScan(x, dt, A, B, C, D, dt_bias, ssm_state[layer])

mq::SSDStateUpdateFloat is the FP32 export's: float dt, no quant points, mq::SSDScanFloat. The bodies are
made per model (the conv's channels and taps, and the split of x|B|C, are constants of the graph).
"""

from __future__ import annotations

from mq_deploy.export.scan_op import DOMAIN
from mq_deploy.export.ssd_op import LIMIT_ATTRS, OP, OP_FLOAT, SCALE_ATTRS, SHAPE_ATTRS, _Nodes

OP_UPDATE = "SSDStateUpdate"
OP_UPDATE_FLOAT = "SSDStateUpdateFloat"
INPUTS = ("xbc", "dt", "conv_state", "ssm_state", "conv_w", "conv_b", "A", "D", "dt_bias")
OUTPUTS = ("y", "conv_state_out", "ssm_state_out")
UPDATE_SCALE_ATTRS = ("conv_scale",) + SCALE_ATTRS


def _quantize(b: _Nodes, x, scale):
    """int8 codes round(x / scale) clipped to [-128, 127] (QuantizeLinear's rounding: half to even), for a
    scale that is per tensor or per channel of the last axis."""
    from onnx import TensorProto

    r = b.op("Round", [b.op("Div", [x, scale])])
    return b.op("Cast", [b.op("Clip", [r, b.f32(-128.0), b.f32(127.0)])], to=TensorProto.INT8)


def ssd_state_update_function(cfg, quantized: bool, opset: int = 21):
    """FunctionProto of mq::SSDStateUpdate (quantized) or mq::SSDStateUpdateFloat for a Mamba2Config `cfg`
    (the conv's channels and taps and the x|B|C split are constants of the body, made per model as
    mq::SelectiveStateUpdate's; the scan's sizes and scales are the node's attributes)."""
    from onnx import AttributeProto, TensorProto
    from onnx import helper as h

    b = _Nodes()
    layer = b.attr("value_int", "layer")
    conv_l = b.op("Gather", ["conv_state", layer], axis=0)                    # [b, Cd, K-1]
    ssm_l = b.op("Gather", ["ssm_state", layer], axis=0)                      # [b, H, P, N]
    xt = b.op("Transpose", ["xbc"], perm=[0, 2, 1])                           # [b, Cd, L]
    if quantized:
        s = b.attr("value_float", "conv_scale")
        zp = b.op("Constant", [], value=h.make_tensor("zp", TensorProto.INT8, [], [0]))
        xt = b.op("DequantizeLinear", [b.op("QuantizeLinear", [xt, s, zp]), s, zp])
    seq = b.op("Concat", [conv_l, xt], axis=2)                                # [b, Cd, K-1+L]
    L = b.op("Shape", [xt], start=2, end=3)
    b.nodes.append(h.make_node("Slice", [seq, L, b.ints([2 ** 62]), b.ints([2])], ["conv_state_out"]))
    xc = b.op("Conv", [seq, b.op("Unsqueeze", ["conv_w", b.ints([1])]), "conv_b"], group=cfg.conv_dim,
              kernel_shape=[cfg.d_conv], pads=[0, 0])
    u = b.op("Transpose", [xc], perm=[0, 2, 1])                                # [b, L, Cd]
    u = b.op("Mul", [u, b.op("Sigmoid", [u])])
    gn = cfg.n_groups * cfg.d_state
    x, Bm, Cm = b.op("Split", [u, b.ints([cfg.d_inner, gn, gn])], n_out=3, axis=-1)
    if quantized:
        x, Bm, Cm = (_quantize(b, t, b.attr("value_floats", a)) for t, a in ((x, "x_scale"), (Bm, "B_scale"),
                                                                          (Cm, "C_scale")))
    scan = h.make_node(OP if quantized else OP_FLOAT, [x, "dt", "A", Bm, Cm, "D", "dt_bias", ssm_l],
                       ["y", "ssm_state_out"], domain=DOMAIN)
    kinds = {"dt_min": AttributeProto.FLOAT, "dt_max": AttributeProto.FLOAT}
    for a in SHAPE_ATTRS + LIMIT_ATTRS + (SCALE_ATTRS if quantized else ()):
        kind = kinds.get(a, AttributeProto.FLOATS if a in SCALE_ATTRS else AttributeProto.INT)
        scan.attribute.append(h.make_attribute_ref(a, kind, ref_attr_name=a))
    b.nodes.append(scan)
    attrs = ["layer", "heads", "head_dim", "groups", "d_state"] + (list(UPDATE_SCALE_ATTRS) if quantized else [])
    return h.make_function(DOMAIN, OP_UPDATE if quantized else OP_UPDATE_FLOAT, list(INPUTS), list(OUTPUTS), b.nodes,
                           [h.make_opsetid("", opset), h.make_opsetid(DOMAIN, 1)], attributes=attrs,
                           attribute_protos=[h.make_attribute("chunk", 256), h.make_attribute("dt_min", 0.0),
                                             h.make_attribute("dt_max", float("inf"))])


__all__ = ["INPUTS", "OP_UPDATE", "OP_UPDATE_FLOAT", "OUTPUTS", "UPDATE_SCALE_ATTRS", "ssd_state_update_function"]
