"""ONNX body of the mq::SelectiveScan op: a model-local FunctionProto, so any conformant runtime
(ONNX Runtime included) executes the node with no plugin, and a TensorRT build can strip the body
and bind the native plugin instead.

This is the float32 form: inputs x, delta, A, B, C, D, z, delta_bias, h0 (channels-last, as
`selective_scan_ref`), outputs y and the last state. The recurrence is one ONNX `Scan` over time
whose body reads A from the function's scope; the graph does not grow with the sequence length.
(Issue 4 adds the int8 form: DequantizeLinear of x, delta, B, C, z in front, and the exporter.)
"""

from __future__ import annotations

DOMAIN = "mq"
OP = "SelectiveScan"
INPUTS = ("x", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")
OUTPUTS = ("y", "h_last")


def _scan_body():
    from onnx import TensorProto as T
    from onnx import helper as h

    vi = h.make_tensor_value_info
    nodes = [
        h.make_node("Unsqueeze", ["dt_t", "ax2"], ["dt3"]),          # [b, Di, 1]
        h.make_node("Mul", ["dt3", "A"], ["dtA"]),                  # [b, Di, N]; A from the function scope
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


def selective_scan_function(opset: int = 21):
    """FunctionProto mq::SelectiveScan (float32 inputs), for model.functions."""
    from onnx import helper as h

    tm = [1, 0, 2]   # [b, L, c] <-> [L, b, c]: Scan iterates over axis 0
    nodes = [
        h.make_node("Add", ["delta", "delta_bias"], ["dt_raw"]),
        h.make_node("Softplus", ["dt_raw"], ["dt"]),
        h.make_node("Transpose", ["dt"], ["dt_tm"], perm=tm),
        h.make_node("Transpose", ["x"], ["x_tm"], perm=tm),
        h.make_node("Transpose", ["B"], ["B_tm"], perm=tm),
        h.make_node("Transpose", ["C"], ["C_tm"], perm=tm),
        h.make_node("Scan", ["h0", "dt_tm", "x_tm", "B_tm", "C_tm"], ["h_last", "y_tm"], body=_scan_body(),
                    num_scan_inputs=4),
        h.make_node("Transpose", ["y_tm"], ["y_ssm"], perm=tm),
        h.make_node("Mul", ["x", "D"], ["x_skip"]),
        h.make_node("Add", ["y_ssm", "x_skip"], ["y_pre"]),
        h.make_node("Sigmoid", ["z"], ["z_sig"]),
        h.make_node("Mul", ["z", "z_sig"], ["gate"]),
        h.make_node("Mul", ["y_pre", "gate"], ["y"]),
    ]
    return h.make_function(DOMAIN, OP, list(INPUTS), list(OUTPUTS), nodes, [h.make_opsetid("", opset)])
