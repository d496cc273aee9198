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

mq::SSDStateUpdateInt8State is mq::SSDStateUpdate on states stored as `--state-dtype int8` stores them
(models.state_codec): inputs 2 and 3 int8 (the conv state on conv_scale's grid, where its values lie; the
SSM state as codes), input 9 ssm_state_scale float16 [n_layer, b, H, P] (a scale per (head, head_dim) row);
outputs 1 and 2 int8 and output 3 ssm_state_scale_out float16 [b, H, P]. It decodes its layer, updates it as
mq::SSDStateUpdate and encodes the result (native: plugins/selective_scan/ort/state_codec.cpp); its body is
the same with models.state_codec's nodes on either side.
"""

from __future__ import annotations

from mq_deploy.export.scan_op import DOMAIN
from mq_deploy.export.ssd_op import LIMIT_ATTRS, OP, OP_FLOAT, SCALE_ATTRS, SHAPE_ATTRS, _Nodes

OP_UPDATE = "SSDStateUpdate"
OP_UPDATE_FLOAT = "SSDStateUpdateFloat"
OP_UPDATE_INT8_STATE = "SSDStateUpdateInt8State"
INPUTS = ("xbc", "dt", "conv_state", "ssm_state", "conv_w", "conv_b", "A", "D", "dt_bias")
OUTPUTS = ("y", "conv_state_out", "ssm_state_out")
INPUTS_INT8_STATE = INPUTS + ("ssm_state_scale",)
OUTPUTS_INT8_STATE = OUTPUTS + ("ssm_state_scale_out",)
UPDATE_SCALE_ATTRS = ("conv_scale",) + SCALE_ATTRS


def _quantize(b: _Nodes, x, scale):
    """int8 codes round(x / scale) clipped to [-128, 127] (QuantizeLinear's rounding: half to even), for a
    scale that is per tensor or per channel of the last axis."""
    from onnx import TensorProto

    r = b.op("Round", [b.op("Div", [x, scale])])
    return b.op("Cast", [b.op("Clip", [r, b.f32(-128.0), b.f32(127.0)])], to=TensorProto.INT8)


def ssd_state_update_function(cfg, quantized: bool, opset: int = 21, int8_state: bool = False):
    """FunctionProto of mq::SSDStateUpdate (quantized) or mq::SSDStateUpdateFloat for a Mamba2Config `cfg`
    (the conv's channels and taps and the x|B|C split are constants of the body, made per model as
    mq::SelectiveStateUpdate's; the scan's sizes and scales are the node's attributes). int8_state (quantized
    only): mq::SSDStateUpdateInt8State, the same between its states' decoding and encoding."""
    from onnx import AttributeProto, TensorProto, numpy_helper
    from onnx import helper as h

    from mq_deploy.models import state_codec

    if int8_state and not quantized:
        raise ValueError("an int8-state update is an int8 op's (the conv state is stored on its conv_scale)")
    b = _Nodes()

    def op(op_type, inputs, **attrs):
        return b.op(op_type, inputs, **attrs)

    def const(a):
        return b.op("Constant", [], value=numpy_helper.from_array(a, "v"))

    layer = b.attr("value_int", "layer")
    conv_l = b.op("Gather", ["conv_state", layer], axis=0)                    # [b, Cd, K-1]
    ssm_l = b.op("Gather", ["ssm_state", layer], axis=0)                      # [b, H, P, N]
    if int8_state:
        conv_scale = b.attr("value_float", "conv_scale")
        conv_l = state_codec.grid_decode_nodes(op, conv_l, conv_scale)
        ssm_l = state_codec.rows_decode_nodes(op, const, ssm_l, b.op("Gather", ["ssm_state_scale", layer], axis=0))
    conv_out, ssm_out = ("conv_f_out", "ssm_f_out") if int8_state else ("conv_state_out", "ssm_state_out")
    xt = b.op("Transpose", ["xbc"], perm=[0, 2, 1])                           # [b, Cd, L]
    if quantized:
        s = b.attr("value_float", "conv_scale")
        zp = b.op("Constant", [], value=h.make_tensor("zp", TensorProto.INT8, [], [0]))
        xt = b.op("DequantizeLinear", [b.op("QuantizeLinear", [xt, s, zp]), s, zp])
    seq = b.op("Concat", [conv_l, xt], axis=2)                                # [b, Cd, K-1+L]
    L = b.op("Shape", [xt], start=2, end=3)
    b.nodes.append(h.make_node("Slice", [seq, L, b.ints([2 ** 62]), b.ints([2])], [conv_out]))
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
                       ["y", ssm_out], domain=DOMAIN)
    kinds = {"dt_min": AttributeProto.FLOAT, "dt_max": AttributeProto.FLOAT}
    for a in SHAPE_ATTRS + LIMIT_ATTRS + (SCALE_ATTRS if quantized else ()):
        kind = kinds.get(a, AttributeProto.FLOATS if a in SCALE_ATTRS else AttributeProto.INT)
        scan.attribute.append(h.make_attribute_ref(a, kind, ref_attr_name=a))
    b.nodes.append(scan)
    if int8_state:
        conv_q = state_codec.grid_encode_nodes(op, const, conv_out, b.attr("value_float", "conv_scale"))
        ssm_q, ssm_s = state_codec.rows_encode_nodes(op, const, ssm_out)
        for value, name in ((conv_q, "conv_state_out"), (ssm_q, "ssm_state_out"), (ssm_s, "ssm_state_scale_out")):
            b.nodes.append(h.make_node("Identity", [value], [name]))
    attrs = ["layer", "heads", "head_dim", "groups", "d_state"] + (list(UPDATE_SCALE_ATTRS) if quantized else [])
    name = OP_UPDATE_INT8_STATE if int8_state else OP_UPDATE if quantized else OP_UPDATE_FLOAT
    return h.make_function(DOMAIN, name, list(INPUTS_INT8_STATE if int8_state else INPUTS),
                           list(OUTPUTS_INT8_STATE if int8_state else OUTPUTS), b.nodes,
                           [h.make_opsetid("", opset), h.make_opsetid(DOMAIN, 1)], attributes=attrs,
                           attribute_protos=[h.make_attribute("chunk", 256), h.make_attribute("dt_min", 0.0),
                                             h.make_attribute("dt_max", float("inf"))])


__all__ = ["INPUTS", "INPUTS_INT8_STATE", "OP_UPDATE", "OP_UPDATE_FLOAT", "OP_UPDATE_INT8_STATE", "OUTPUTS",
           "OUTPUTS_INT8_STATE", "UPDATE_SCALE_ATTRS", "ssd_state_update_function"]
