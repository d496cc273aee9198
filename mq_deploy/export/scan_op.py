"""The mq::SelectiveScan ONNX op: its contract and its model-local FunctionProto bodies.

Every node carries a function body, so ONNX Runtime (or any conformant runtime) executes it with no
plugin; a TensorRT build strips the body so the parser binds the native plugin
(plugins/selective_scan/) instead. The plugin, the CPU/CUDA libraries and
`mq_deploy.ops.selective_scan.selective_scan_int8_ref` all implement this one contract:

    mq::SelectiveScan (domain "mq", version 1)
    inputs   0 x           int8   [b, L, D]   conv output after SiLU (the scan's u)
             1 delta       int8   [b, L, D]   dt_proj output, before its bias
             2 A           float  [D, N]      -exp(A_log)
             3 B           int8   [b, L, N]
             4 C           int8   [b, L, N]
             5 D           float  [D]         skip
             6 z           int8   [b, L, D]   gate input
             7 delta_bias  float  [D]
             8 gate_scale  float  [D]         gate = z * sigmoid(gate_scale * z); all ones = silu(z)
             9 h0          float  [b, D, N]   initial state (zeros for a fresh sequence)
    outputs  0 y           float or float16 (out_dtype) [b, L, D]
             1 h_last      float  [b, D, N]   state after the last step
    attributes x_scale, delta_scale, B_scale, C_scale, z_scale (float, per-tensor, zero point 0:
             value = q * scale); out_dtype (int, TensorProto enum, 1 float (default) or 10 float16)

    dt  = softplus(delta * delta_scale + delta_bias)
    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t)[:, None] * B_t[None, :]
    y_t = (h_t @ C_t + D * x_t) * gate(z_t)

The int8 inputs come straight from QuantizeLinear nodes (pattern Q -> mq::SelectiveScan), never
through DequantizeLinear. Scales are node attributes so that TensorRT gets them as plugin fields.

mq::SelectiveScanFloat is the same op with float32 x, delta, B, C, z and no scale attributes: the
FP32 baseline export uses it (function body only; no plugin implements it).
"""

from __future__ import annotations

DOMAIN = "mq"
OP = "SelectiveScan"
OP_FLOAT = "SelectiveScanFloat"
INPUTS = ("x", "delta", "A", "B", "C", "D", "z", "delta_bias", "gate_scale", "h0")
OUTPUTS = ("y", "h_last")
INT8_INPUTS = ("x", "delta", "B", "C", "z")
SCALE_ATTRS = tuple(f"{n}_scale" for n in INT8_INPUTS)


def _scan_body():
    """One time step of the recurrence (the ONNX Scan body); A comes from the function's scope."""
    from onnx import TensorProto as T
    from onnx import helper as h

    vi = h.make_tensor_value_info
    nodes = [
        h.make_node("Unsqueeze", ["dt_t", "ax2"], ["dt3"]),          # [b, D, 1]
        h.make_node("Mul", ["dt3", "A"], ["dtA"]),                  # [b, D, N]
        h.make_node("Exp", ["dtA"], ["dA"]),
        h.make_node("Mul", ["dt_t", "x_t"], ["dtx"]),
        h.make_node("Unsqueeze", ["dtx", "ax2"], ["dtx3"]),
        h.make_node("Unsqueeze", ["B_t", "ax1"], ["B3"]),             # [b, 1, N]
        h.make_node("Mul", ["dtx3", "B3"], ["drive"]),
        h.make_node("Mul", ["dA", "h_in"], ["decayed"]),
        h.make_node("Add", ["decayed", "drive"], ["h_out"]),
        h.make_node("Unsqueeze", ["C_t", "ax1"], ["C3"]),
        h.make_node("Mul", ["h_out", "C3"], ["hc"]),
        h.make_node("ReduceSum", ["hc", "ax2"], ["y_t"], keepdims=0),
    ]
    return h.make_graph(
        nodes, "selective_scan_step",
        [vi("h_in", T.FLOAT, ["b", "d", "n"]), vi("dt_t", T.FLOAT, ["b", "d"]), vi("x_t", T.FLOAT, ["b", "d"]),
         vi("B_t", T.FLOAT, ["b", "n"]), vi("C_t", T.FLOAT, ["b", "n"])],
        [vi("h_out", T.FLOAT, ["b", "d", "n"]), vi("y_t", T.FLOAT, ["b", "d"])],
        initializer=[h.make_tensor("ax1", T.INT64, [1], [1]), h.make_tensor("ax2", T.INT64, [1], [2])])


def _float_nodes(x, delta, B, C, z, y="y_f"):
    """The recurrence on float tensors named x, delta, B, C, z (A, D, delta_bias, gate_scale, h0 inputs)."""
    from onnx import helper as h

    tm = [1, 0, 2]   # [b, L, c] <-> [L, b, c]: Scan iterates over axis 0
    return [
        h.make_node("Add", [delta, "delta_bias"], ["dt_raw"]),
        h.make_node("Softplus", ["dt_raw"], ["dt"]),
        h.make_node("Transpose", ["dt"], ["dt_tm"], perm=tm),
        h.make_node("Transpose", [x], ["x_tm"], perm=tm),
        h.make_node("Transpose", [B], ["B_tm"], perm=tm),
        h.make_node("Transpose", [C], ["C_tm"], perm=tm),
        h.make_node("Scan", ["h0", "dt_tm", "x_tm", "B_tm", "C_tm"], ["h_last", "y_tm"], body=_scan_body(),
                    num_scan_inputs=4),
        h.make_node("Transpose", ["y_tm"], ["y_ssm"], perm=tm),
        h.make_node("Mul", [x, "D"], ["x_skip"]),
        h.make_node("Add", ["y_ssm", "x_skip"], ["y_pre"]),
        h.make_node("Mul", [z, "gate_scale"], ["z_s"]),
        h.make_node("Sigmoid", ["z_s"], ["z_sig"]),
        h.make_node("Mul", [z, "z_sig"], ["gate"]),
        h.make_node("Mul", ["y_pre", "gate"], [y]),
    ]


def selective_scan_function(opset: int = 21):
    """FunctionProto mq::SelectiveScan (int8 inputs, scale attributes), for model.functions."""
    from onnx import AttributeProto, TensorProto
    from onnx import helper as h

    nodes = []
    for name in INT8_INPUTS:
        scale = h.make_node("Constant", [], [f"{name}_scale_t"])
        scale.attribute.append(h.make_attribute_ref("value_float", AttributeProto.FLOAT,
                                                    ref_attr_name=f"{name}_scale"))
        nodes += [scale, h.make_node("DequantizeLinear", [name, f"{name}_scale_t"], [f"{name}_f"])]
    nodes += _float_nodes("x_f", "delta_f", "B_f", "C_f", "z_f")
    cast = h.make_node("Cast", ["y_f"], ["y"])
    cast.attribute.append(h.make_attribute_ref("to", AttributeProto.INT, ref_attr_name="out_dtype"))
    nodes.append(cast)
    return h.make_function(DOMAIN, OP, list(INPUTS), list(OUTPUTS), nodes, [h.make_opsetid("", opset)],
                           attributes=list(SCALE_ATTRS),
                           attribute_protos=[h.make_attribute("out_dtype", int(TensorProto.FLOAT))])


def selective_scan_float_function(opset: int = 21):
    """FunctionProto mq::SelectiveScanFloat (float32 inputs), the FP32 baseline's scan."""
    from onnx import helper as h

    nodes = _float_nodes("x", "delta", "B", "C", "z", y="y")
    return h.make_function(DOMAIN, OP_FLOAT, list(INPUTS), list(OUTPUTS), nodes, [h.make_opsetid("", opset)])
