"""The mq::SSDScan ONNX op (Mamba2's scan): its contract and its model-local FunctionProto bodies.

As for mq::SelectiveScan (scan_op.py), every node carries a function body in standard ONNX ops, so ONNX
Runtime or any conformant runtime runs it with no plugin; a native library may bind the op instead.

    mq::SSDScan (domain "mq", version 1)
    inputs   0 x        int8   [b, L, H*P]   conv output after SiLU, heads of P channels
             1 dt       int8   [b, L, H]     in_proj's dt, before its bias
             2 A        float  [H]           -exp(A_log), one per head
             3 B        int8   [b, L, G*N]   G groups of N states; head h reads group h // (H / G)
             4 C        int8   [b, L, G*N]
             5 D        float  [H]           skip, per head
             6 dt_bias  float  [H]
             7 h0       float  [b, H, P, N]  initial state (zeros for a fresh sequence)
    outputs  0 y        float  [b, L, H*P]   scan output + D x (the gate is the gated norm's, after the op)
             1 h_last   float  [b, H, P, N]  state after the last step
    attributes x_scale, dt_scale, B_scale, C_scale (floats: one per-tensor value, or one per channel of
             the tensor's last axis: H*P for x, H for dt, G*N for B and C; value = q * scale, zero point 0);
             heads, head_dim, groups, d_state (ints, the shapes above); chunk (int, the chunk length of the
             matmul form; the result does not depend on it in exact arithmetic); dt_min, dt_max (floats:
             dt is clamped to them after softplus; dt_max may be +inf)

    dt  = clamp(softplus(dt * dt_scale + dt_bias), dt_min, dt_max)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t          per head
    y_t = h_t . C_t + D * x_t

The body is the chunked (SSD) form: inside chunks of Q = max(1, min(chunk, L)) steps a masked matmul
(C B^T o decay) (dt x), across chunks the recurrence as an ONNX Scan over the chunks. The int8 inputs come
straight from QuantizeLinear nodes (Q -> mq::SSDScan, never DQ -> op).

mq::SSDScanFloat is the same op with float32 x, dt, B, C and no scale attributes (the FP32 export).
mq_deploy.ops.ssd.ssd_scan_int8_ref is this contract in PyTorch.
"""

from __future__ import annotations

from mq_deploy.export.scan_op import DOMAIN

OP = "SSDScan"
OP_FLOAT = "SSDScanFloat"
INPUTS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")
OUTPUTS = ("y", "h_last")
INT8_INPUTS = ("x", "dt", "B", "C")
SCALE_ATTRS = tuple(f"{n}_scale" for n in INT8_INPUTS)
SHAPE_ATTRS = ("heads", "head_dim", "groups", "d_state", "chunk")
LIMIT_ATTRS = ("dt_min", "dt_max")


class _Nodes:
    """A small builder for function bodies: unique names, constants as Constant nodes."""

    def __init__(self):
        self.nodes, self._n = [], 0

    def op(self, op_type, inputs, n_out=1, **attrs):
        from onnx import helper as h

        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(h.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def ints(self, values):
        from onnx import TensorProto
        from onnx import helper as h

        return self.op("Constant", [], value=h.make_tensor("v", TensorProto.INT64, [len(values)], list(values)))

    def f32(self, value):
        from onnx import TensorProto
        from onnx import helper as h

        return self.op("Constant", [], value=h.make_tensor("v", TensorProto.FLOAT, [], [float(value)]))

    def attr(self, kind: str, name: str):
        """A Constant holding attribute `name` of the function (kind: value_float, value_floats, value_int)."""
        from onnx import AttributeProto
        from onnx import helper as h

        types = {"value_float": AttributeProto.FLOAT, "value_floats": AttributeProto.FLOATS,
                 "value_int": AttributeProto.INT}
        self._n += 1
        out = f"attr_{name}_{self._n}"
        node = h.make_node("Constant", [], [out])
        node.attribute.append(h.make_attribute_ref(kind, types[kind], ref_attr_name=name))
        self.nodes.append(node)
        return out

    def dim(self, shape, i):
        return self.op("Slice", [shape, self.ints([i]), self.ints([i + 1])])


def _chunk_recurrence_body():
    """One step of the recurrence across chunks (the ONNX Scan body): h <- decay * h + S; emits the start state."""
    from onnx import TensorProto as T
    from onnx import helper as h

    vi = h.make_tensor_value_info
    nodes = [h.make_node("Unsqueeze", ["decay_c", "axes"], ["decay4"]),          # [b, H, 1, 1]
             h.make_node("Mul", ["decay4", "h_in"], ["kept"]),
             h.make_node("Add", ["kept", "S_c"], ["h_out"]),
             h.make_node("Identity", ["h_in"], ["start_c"])]
    return h.make_graph(
        nodes, "ssd_chunk_step",
        [vi("h_in", T.FLOAT, ["b", "h", "p", "n"]), vi("decay_c", T.FLOAT, ["b", "h"]),
         vi("S_c", T.FLOAT, ["b", "h", "p", "n"])],
        [vi("h_out", T.FLOAT, ["b", "h", "p", "n"]), vi("start_c", T.FLOAT, ["b", "h", "p", "n"])],
        initializer=[h.make_tensor("axes", T.INT64, [2], [2, 3])])


def _float_nodes(b: _Nodes, x, dt, B, C, y="y"):
    """The chunked scan on float tensors named x, dt, B, C (A, D, dt_bias, h0 inputs); writes `y`, h_last."""
    from onnx import TensorProto
    from onnx import helper as h

    # shapes, all from the inputs (the shape attributes are for native implementations and checks)
    sx, sh = b.op("Shape", [x]), b.op("Shape", ["h0"])
    bs, L = b.dim(sx, 0), b.dim(sx, 1)
    H, P, N = b.dim(sh, 1), b.dim(sh, 2), b.dim(sh, 3)
    G = b.op("Div", [b.dim(b.op("Shape", [B]), 2), N])
    R = b.op("Div", [H, G])                                                     # heads per group
    # dt = clamp(softplus(dt + bias), dt_min, dt_max)
    d = b.op("Softplus", [b.op("Add", [dt, "dt_bias"])])
    d = b.op("Min", [b.op("Max", [d, b.attr("value_float", "dt_min")]), b.attr("value_float", "dt_max")])
    # chunks of Q = min(chunk, L) steps; L padded with zeros to a multiple of Q (dt = 0 steps change nothing)
    Q = b.op("Max", [b.op("Min", [b.op("Unsqueeze", [b.attr("value_int", "chunk"), b.ints([0])]), L]), b.ints([1])])
    pad = b.op("Mod", [b.op("Sub", [Q, b.op("Mod", [L, Q])]), Q])
    nc = b.op("Div", [b.op("Add", [L, pad]), Q])
    pads = b.op("Concat", [b.ints([0, 0, 0, 0]), pad, b.ints([0])], axis=0)

    def chunked(t, *tail):                  # [b, L, ...] -> [b, nc, Q, *tail]
        return b.op("Reshape", [b.op("Pad", [t, pads]), b.op("Concat", [bs, nc, Q, *tail], axis=0)])

    x5 = b.op("Transpose", [chunked(x, H, P)], perm=[0, 1, 3, 2, 4])             # [b, c, H, Q, P]
    dt4 = b.op("Transpose", [chunked(d, H)], perm=[0, 1, 3, 2])                  # [b, c, H, Q]
    one = b.ints([1])

    def per_head(t):                        # [b, L, G*N] -> [b, c, H, Q, N]
        g6 = chunked(t, G, one, N)
        g6 = b.op("Expand", [g6, b.op("Concat", [bs, nc, Q, G, R, N], axis=0)])
        return b.op("Transpose", [b.op("Reshape", [g6, b.op("Concat", [bs, nc, Q, H, N], axis=0)])],
                    perm=[0, 1, 3, 2, 4])

    B5, C5 = per_head(B), per_head(C)
    xd = b.op("Mul", [x5, b.op("Unsqueeze", [dt4, b.ints([-1])])])             # dt_j x_j
    a = b.op("Mul", [dt4, b.op("Unsqueeze", ["A", b.ints([-1])])])             # log decay per step [b, c, H, Q]
    acs = b.op("CumSum", [a, b.ints([3])])
    seg = b.op("Sub", [b.op("Unsqueeze", [acs, b.ints([-1])]), b.op("Unsqueeze", [acs, b.ints([-2])])])
    ones = b.op("ConstantOfShape", [b.op("Concat", [Q, Q], axis=0)],
                value=h.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    causal = b.op("Cast", [b.op("Trilu", [ones], upper=0)], to=TensorProto.BOOL)        # j <= i
    decay = b.op("Exp", [b.op("Where", [causal, seg, b.f32(float("-inf"))])])    # [b, c, H, Qi, Qj]
    scores = b.op("MatMul", [C5, b.op("Transpose", [B5], perm=[0, 1, 2, 4, 3])])
    y_in = b.op("MatMul", [b.op("Mul", [scores, decay]), xd])                    # inside the chunk [b, c, H, Q, P]
    last = b.op("Slice", [acs, b.ints([-1]), b.ints([2 ** 62]), b.ints([3])])    # [b, c, H, 1]
    to_end = b.op("Exp", [b.op("Sub", [last, acs])])
    S = b.op("MatMul", [b.op("Transpose", [xd], perm=[0, 1, 2, 4, 3]),
                        b.op("Mul", [B5, b.op("Unsqueeze", [to_end, b.ints([-1])])])])   # [b, c, H, P, N]
    chunk_decay = b.op("Exp", [b.op("Squeeze", [last, b.ints([3])])])           # [b, c, H]
    b.nodes.append(h.make_node(
        "Scan", ["h0", chunk_decay, S], ["h_last", "starts"], body=_chunk_recurrence_body(), num_scan_inputs=2,
        scan_input_axes=[1, 1], scan_output_axes=[1]))                          # starts [b, c, H, P, N]
    y_off = b.op("Mul", [b.op("MatMul", [C5, b.op("Transpose", ["starts"], perm=[0, 1, 2, 4, 3])]),
                         b.op("Unsqueeze", [b.op("Exp", [acs]), b.ints([-1])])])
    y5 = b.op("Transpose", [b.op("Add", [y_in, y_off])], perm=[0, 1, 3, 2, 4])  # [b, c, Q, H, P]
    HP = b.op("Mul", [H, P])
    yl = b.op("Slice", [b.op("Reshape", [y5, b.op("Concat", [bs, b.ints([-1]), HP], axis=0)]), b.ints([0]), L,
                        b.ints([1])])
    D_ch = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", ["D", b.ints([-1])]), b.op("Concat", [H, P], axis=0)]),
                            HP])
    b.nodes.append(h.make_node("Add", [yl, b.op("Mul", [x, D_ch])], [y]))


def _attribute_protos():
    from onnx import helper as h

    return [h.make_attribute("chunk", 256), h.make_attribute("dt_min", 0.0), h.make_attribute("dt_max", float("inf"))]


def ssd_scan_function(opset: int = 21):
    """FunctionProto mq::SSDScan (int8 x, dt, B, C; scale attributes), for model.functions."""
    from onnx import TensorProto
    from onnx import helper as h

    b = _Nodes()
    deq = {}
    for name in INT8_INPUTS:
        deq[name] = b.op("Mul", [b.op("Cast", [name], to=TensorProto.FLOAT), b.attr("value_floats", f"{name}_scale")])
    _float_nodes(b, deq["x"], deq["dt"], deq["B"], deq["C"])
    return h.make_function(DOMAIN, OP, list(INPUTS), list(OUTPUTS), b.nodes, [h.make_opsetid("", opset)],
                           attributes=list(SCALE_ATTRS) + ["heads", "head_dim", "groups", "d_state"],
                           attribute_protos=_attribute_protos())


def ssd_scan_float_function(opset: int = 21):
    """FunctionProto mq::SSDScanFloat (float32 x, dt, B, C), the FP32 export's scan."""
    from onnx import helper as h

    b = _Nodes()
    _float_nodes(b, "x", "dt", "B", "C")
    return h.make_function(DOMAIN, OP_FLOAT, list(INPUTS), list(OUTPUTS), b.nodes, [h.make_opsetid("", opset)],
                           attributes=["heads", "head_dim", "groups", "d_state"],
                           attribute_protos=_attribute_protos())


__all__ = ["INPUTS", "INT8_INPUTS", "OP", "OP_FLOAT", "OUTPUTS", "SCALE_ATTRS", "ssd_scan_float_function",
           "ssd_scan_function"]
