"""mq::SelectiveStateUpdate and mq::SelectiveStateUpdateFloat: a Mamba1 mixer's conv, x_proj, dt_proj and
scan for L >= 1 tokens that continue from the decode states, as one op of the decode-step graph.

At seq = 1 the unfused step graph runs ~20 small nodes per layer between in_proj and the rotation
(Transpose, the conv-state Concat/Slice, Conv, SiLU, five quant points, two MatMuls, Split, the scan), each
paying ORT's per-node overhead for a few microseconds of work. The native kernel
(plugins/selective_scan/ort/state_update.cpp) does them in one call; the function body below is the
same computation in standard ops plus mq::SelectiveScan, so the graph runs unchanged without the
library (ORT inlines the body) and is the kernel's reference.

    mq::SelectiveStateUpdate (domain "mq", version 1)
    inputs   0 x              float [b, L, Di]    in_proj's x half
             1 z              int8  [b, L, Di]    in_proj's z half after its QuantizeLinear
             2 conv_state     float [n_layer, b, Di, K-1]  every layer's last K-1 conv inputs (after the
                                  conv1d quant point): the step graph's stacked input; the op reads
                                  conv_state[layer]
             3 ssm_state      float [n_layer, b, Di, N]     likewise, ssm_state[layer]
             4 conv_w         float [Di, K]       the dequantized int8 conv weights (q * scale)
             5 conv_b         float [Di]
             6 x_proj_w       int8  [R+2N, Di]    per output row scales in 7
             7 x_proj_scale   float [R+2N]
             8 dt_proj_w      int8  [R, Di]       dt_proj's weight transposed; per column scales in 9
             9 dt_proj_scale  float [Di]
            10 delta_bias     float [Di]
            11 A              float [Di, N]       -exp(A_log)
            12 D              float [Di]
            13 gate_scale     float [Di]
    outputs  0 y              float [b, L, Di]
             1 conv_state_out float [b, Di, K-1]
             2 ssm_state_out  float [b, Di, N]
    attributes layer (int: which slice of the stacked states); conv_scale, x_scale, dt_low_scale,
             delta_scale, B_scale, C_scale, z_scale (float, per-tensor, zero point 0); norm_eps (float,
             FalconMamba only: the weightless RMSNorm on dt_low, B and C)

    xin = qdq(x, conv_scale); seq = [conv_state[layer] | xin] along time; conv_state_out = its last K-1
    u = q(silu(conv(seq) + conv_b), x_scale)
    dt_low, B, C = split(dq(u) dq(x_proj_w)^T); FalconMamba: each / rms
    delta = q(qdq(dt_low, dt_low_scale) dq(dt_proj_w)^T, delta_scale); B, C -> q(., B/C_scale)
    y, ssm_state_out = mq::SelectiveScan(u, delta, A, B, C, D, z, delta_bias, gate_scale, ssm_state[layer])

Reading the layer's slice inside the op spares the step graph a Gather (which ONNX Runtime turns into a
Split and a Squeeze per layer) of each state.

mq::SelectiveStateUpdateFloat is the FP32 baseline's: float z, x_proj_w [R+2N, Di] and dt_proj_w [R, Di]
(inputs 0-6, then dt_proj_w, delta_bias, A, D, gate_scale: 12 inputs), no quant points, and
mq::SelectiveScanFloat for the scan.

mq::SelectiveStateUpdateInt8State is the int8 op with the states stored as `--state-dtype int8` stores them
(models.state_codec): inputs 2 and 3 int8 (the conv state on conv_scale's grid, which is where its values
lie; the SSM state as codes), input 14 ssm_state_scale float16 [n_layer, b, Di] (the SSM state's row
scales); outputs 1 and 2 int8 and output 3 ssm_state_scale_out float16 [b, Di]. The op decodes its layer,
updates it as mq::SelectiveStateUpdate and encodes the result (native: state_codec.cpp), so the step graph
converts nothing around it; its body is the same with models.state_codec's nodes on either side.

The bodies are made per model (d_inner, d_conv, dt_rank and d_state are constants of the graph, the
scales attributes of each node): `state_update_function(cfg, quantized, opset, int8_state)`.
"""

from __future__ import annotations

import numpy as np

from mq_deploy.export.scan_op import DOMAIN, OP, OP_FLOAT

OP_UPDATE = "SelectiveStateUpdate"
OP_UPDATE_FLOAT = "SelectiveStateUpdateFloat"
OP_UPDATE_INT8_STATE = "SelectiveStateUpdateInt8State"
INPUTS = ("x", "z", "conv_state", "ssm_state", "conv_w", "conv_b", "x_proj_w", "x_proj_scale", "dt_proj_w",
          "dt_proj_scale", "delta_bias", "A", "D", "gate_scale")
INPUTS_FLOAT = ("x", "z", "conv_state", "ssm_state", "conv_w", "conv_b", "x_proj_w", "dt_proj_w", "delta_bias",
                "A", "D", "gate_scale")
OUTPUTS = ("y", "conv_state_out", "ssm_state_out")
INPUTS_INT8_STATE = INPUTS + ("ssm_state_scale",)
OUTPUTS_INT8_STATE = OUTPUTS + ("ssm_state_scale_out",)
SCALE_ATTRS = ("conv_scale", "x_scale", "dt_low_scale", "delta_scale", "B_scale", "C_scale", "z_scale")


def state_update_function(cfg, quantized: bool, opset: int = 21, int8_state: bool = False):
    """FunctionProto of mq::SelectiveStateUpdate (quantized) or mq::SelectiveStateUpdateFloat for a
    MixerConfig `cfg` (d_inner, d_conv, dt_rank, d_state, mixer_rms_eps); int8_state (quantized only):
    mq::SelectiveStateUpdateInt8State, the same between the decoding of its int8 states and their encoding
    (models.state_codec's nodes)."""
    from onnx import AttributeProto, numpy_helper
    from onnx import helper as h

    if int8_state and not quantized:
        raise ValueError("an int8-state update is an int8 op's (the conv state is stored on its conv_scale)")
    nodes = []

    def const(name, value):
        nodes.append(h.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)))
        return name

    def ref(name, attr):
        n = h.make_node("Constant", [], [name])
        n.attribute.append(h.make_attribute_ref("value_float", AttributeProto.FLOAT, ref_attr_name=attr))
        nodes.append(n)
        return name

    def node(op, ins, out, **attrs):
        nodes.append(h.make_node(op, ins, [out] if isinstance(out, str) else list(out), **attrs))
        return out

    zp = const("zp", np.array(0, dtype=np.int8)) if quantized else None

    def q(x, scale, out):
        return node("QuantizeLinear", [x, scale, zp], out)

    def dq(x, scale, out, **attrs):
        if not attrs:
            return node("DequantizeLinear", [x, scale, zp], out)
        # per axis: explicit zero points of the weight's own, as export writes them (export/graph.py
        # _Builder.axis_zero_point: ONNX Runtime's exact int8 GEMM without VNNI needs them)
        axis_zp = node("ConstantOfShape", [node("Shape", [scale], f"{out}_zp_shape")], f"{out}_zp",
                       value=numpy_helper.from_array(np.zeros(1, dtype=np.int8), "zero"))
        return node("DequantizeLinear", [x, scale, axis_zp], out, **attrs)

    if quantized:
        for a in SCALE_ATTRS:
            ref(a + "_t", a)
    layer = h.make_node("Constant", [], ["layer_t"])
    layer.attribute.append(h.make_attribute_ref("value_int", AttributeProto.INT, ref_attr_name="layer"))
    nodes.append(layer)
    if int8_state:      # this layer's int8 states as float32: the conv state on conv_scale, the SSM state per row
        from mq_deploy.models import state_codec

        n_codec = [0]

        def op(op_type, ins, **attrs):
            n_codec[0] += 1
            return node(op_type, ins, f"codec_{n_codec[0]}", **attrs)

        def const_t(a):
            n_codec[0] += 1
            return const(f"codec_c{n_codec[0]}", a)

        cq = node("Gather", ["conv_state", "layer_t"], "conv_lq", axis=0)
        node("Identity", [state_codec.grid_decode_nodes(op, cq, "conv_scale_t")], "conv_l")
        hq = node("Gather", ["ssm_state", "layer_t"], "ssm_lq", axis=0)
        hs = node("Gather", ["ssm_state_scale", "layer_t"], "ssm_ls", axis=0)
        node("Identity", [state_codec.rows_decode_nodes(op, const_t, hq, hs)], "ssm_l")
        conv_out, ssm_out = "conv_f_out", "ssm_f_out"
    else:
        node("Gather", ["conv_state", "layer_t"], "conv_l", axis=0)                           # [b, Di, K-1]
        node("Gather", ["ssm_state", "layer_t"], "ssm_l", axis=0)                             # [b, Di, N]
        conv_out, ssm_out = "conv_state_out", "ssm_state_out"
    xt = node("Transpose", ["x"], "xt", perm=[0, 2, 1])                                   # [b, Di, L]
    if quantized:
        xt = dq(q(xt, "conv_scale_t", "xt_q"), "conv_scale_t", "xt_dq")
    node("Concat", ["conv_l", xt], "seq", axis=2)                                     # [b, Di, K-1+L]
    node("Shape", [xt], "L", start=2, end=3)
    node("Slice", ["seq", "L", const("big", np.array([np.iinfo(np.int64).max])), const("ax2", np.array([2]))],
         conv_out)
    node("Unsqueeze", ["conv_w", const("ax1", np.array([1]))], "w3")                       # [Di, 1, K]
    node("Conv", ["seq", "w3", "conv_b"], "xc", group=cfg.d_inner, kernel_shape=[cfg.d_conv], pads=[0, 0])
    node("Transpose", ["xc"], "xc_t", perm=[0, 2, 1])
    node("Mul", ["xc_t", node("Sigmoid", ["xc_t"], "xc_sig")], "u")
    if quantized:
        u_in = q("u", "x_scale_t", "u_q")
        u = dq(u_in, "x_scale_t", "u_dq")
        xw = dq("x_proj_w", "x_proj_scale", "xw_dq", axis=0)
        dw = dq("dt_proj_w", "dt_proj_scale", "dw_dq", axis=1)
    else:
        u_in = u = "u"
        xw, dw = "x_proj_w", "dt_proj_w"
    node("MatMul", [u, node("Transpose", [xw], "xw_t", perm=[1, 0])], "dbc")
    node("Split", ["dbc", const("sizes", np.array([cfg.dt_rank, cfg.d_state, cfg.d_state]))],
         ["dt_low", "B", "C"], axis=-1)
    parts = ["dt_low", "B", "C"]
    if cfg.mixer_rms_eps is not None:     # FalconMamba: weightless RMSNorm (as _Builder.rms_norm)
        eps = ref("eps_t", "norm_eps")
        axm1 = const("axm1", np.array([-1]))
        for i, t in enumerate(parts):
            ms = node("ReduceMean", [node("Mul", [t, t], f"{t}_sq"), axm1], f"{t}_ms", keepdims=1)
            inv = node("Reciprocal", [node("Sqrt", [node("Add", [ms, eps], f"{t}_mse")], f"{t}_rms")], f"{t}_inv")
            parts[i] = node("Mul", [t, inv], f"{t}_n")
    dt_low, Bm, Cm = parts
    if quantized:
        dt_low = dq(q(dt_low, "dt_low_scale_t", "dt_low_q"), "dt_low_scale_t", "dt_low_dq")
    node("MatMul", [dt_low, dw], "delta")
    if quantized:
        scan_in = [u_in, q("delta", "delta_scale_t", "delta_q"), "A", q(Bm, "B_scale_t", "B_q"),
                   q(Cm, "C_scale_t", "C_q"), "D", "z", "delta_bias", "gate_scale", "ssm_l"]
        scan = h.make_node(OP, scan_in, ["y", ssm_out], domain=DOMAIN)
        for n in ("x", "delta", "B", "C", "z"):
            scan.attribute.append(h.make_attribute_ref(f"{n}_scale", AttributeProto.FLOAT, ref_attr_name=f"{n}_scale"))
    else:
        scan = h.make_node(OP_FLOAT, [u, "delta", "A", Bm, Cm, "D", "z", "delta_bias", "gate_scale", "ssm_l"],
                           ["y", "ssm_state_out"], domain=DOMAIN)
    nodes.append(scan)
    if int8_state:
        node("Identity", [state_codec.grid_encode_nodes(op, const_t, conv_out, "conv_scale_t")], "conv_state_out")
        q_rows, s_rows = state_codec.rows_encode_nodes(op, const_t, ssm_out)
        node("Identity", [q_rows], "ssm_state_out")
        node("Identity", [s_rows], "ssm_state_scale_out")
    attrs = ["layer"] + (list(SCALE_ATTRS) if quantized else [])
    if cfg.mixer_rms_eps is not None:
        attrs.append("norm_eps")
    name = OP_UPDATE_INT8_STATE if int8_state else OP_UPDATE if quantized else OP_UPDATE_FLOAT
    ins = INPUTS_INT8_STATE if int8_state else INPUTS if quantized else INPUTS_FLOAT
    return h.make_function(DOMAIN, name, list(ins), list(OUTPUTS_INT8_STATE if int8_state else OUTPUTS), nodes,
                           [h.make_opsetid("", opset), h.make_opsetid(DOMAIN, 1)], attributes=attrs)

