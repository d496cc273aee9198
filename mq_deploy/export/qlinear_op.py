"""mq::QLinear and mq::DynamicQLinear: the decode-step graph's int8 linears as one node each.

A quantized linear is written as QuantizeLinear -> DequantizeLinear (the activation's quant point) and
DequantizeLinear (the int8 weight, per output channel) -> MatMul, and the int8 head as DynamicQuantizeLinear ->
MatMulInteger -> Cast -> Mul. ONNX Runtime fuses those into its int8 kernels, but at a decode step (one row per
sequence) each linear is a few microseconds of weight reading behind per-node costs, and its int8 GEMM is not
at its best on one row. In step graphs (`build_model(step=True)`, fused_step) `fuse` rewrites each pattern
into one node; the function bodies below are the same patterns, so a runtime without our library (or with it
where the fast kernel does not run: the library registers these ops only on CPUs with AVX-512 VNNI) inlines
them and runs exactly the graph it ran before. TensorRT parses the bodies (plain QDQ) as before.

    mq::QLinear (domain "mq", version 1)
    inputs   0 x             float [..., K]
             1 x_scale       float scalar      the quant point's per-tensor scale
             2 x_zero_point  int8  scalar      0
             3 w             int8  [K, N]      MatMul's B; a constant initializer (the kernel packs it once)
             4 w_scale       float [N]         per output channel
             5 w_zero_point  int8  [N]         all 0
    output   0 y             float [..., N]
    y = DequantizeLinear(QuantizeLinear(x, x_scale, 0), x_scale, 0) @ DequantizeLinear(w, w_scale, 0, axis=1)

    mq::DynamicQLinear (domain "mq", version 1): the int8 head (fakequant.Int8Head, act "dynamic")
    inputs   0 x float [..., K]; 1 w int8 [K, N]; 2 w_scale float [N]; 3 w_zero_point int8 [N] (all 0)
    output   0 y float [..., N]
    xq, xs, xz = DynamicQuantizeLinear(x)      (uint8, one scale and zero point over the whole tensor)
    y = Cast(MatMulInteger(xq, w, xz, w_zero_point), float) * (xs * w_scale)

The native kernel (plugins/selective_scan/ort/qlinear.cpp) sums the integer products exactly in int32 and
scales once; the bodies' float MatMul of dequantized values (or ONNX Runtime's own int8 kernels) differ from it
by float rounding of the sums (tests/test_qlinear.py states the tolerances).
"""

from __future__ import annotations

from mq_deploy.export.scan_op import DOMAIN

OP_QLINEAR = "QLinear"
OP_DYNAMIC = "DynamicQLinear"
QLINEAR_INPUTS = ("x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point")
# the kernel's exact int32 sums hold |u w| <= 2^15 for K below this (qlinear_ops.cpp refuses larger K); a wider
# linear keeps its QDQ form, so that a session never fails to load for it
MAX_K = 1 << 16
DYNAMIC_INPUTS = ("x", "w", "w_scale", "w_zero_point")
# each op's scale inputs (by index), which a runner checks like QuantizeLinear's before running a file
SCALE_INPUTS = {OP_QLINEAR: (1, 4), OP_DYNAMIC: (2,)}


def qlinear_function(opset: int = 21):
    """FunctionProto of mq::QLinear: the QDQ linear it replaces."""
    from onnx import helper as h

    nodes = [h.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"]),
             h.make_node("DequantizeLinear", ["w", "w_scale", "w_zero_point"], ["wd"], axis=1),
             h.make_node("MatMul", ["xd", "wd"], ["y"])]
    return h.make_function(DOMAIN, OP_QLINEAR, list(QLINEAR_INPUTS), ["y"], nodes, [h.make_opsetid("", opset)])


def dynamic_qlinear_function(opset: int = 21):
    """FunctionProto of mq::DynamicQLinear: the int8 head's pattern it replaces."""
    from onnx import TensorProto
    from onnx import helper as h

    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             h.make_node("MatMulInteger", ["xq", "w", "xz", "w_zero_point"], ["acc"]),
             h.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
             h.make_node("Mul", ["xs", "w_scale"], ["scale"]),
             h.make_node("Mul", ["acc_f", "scale"], ["y"])]
    return h.make_function(DOMAIN, OP_DYNAMIC, list(DYNAMIC_INPUTS), ["y"], nodes, [h.make_opsetid("", opset)])


def functions(op_types: set, opset: int = 21) -> list:
    """The bodies of the ops among `op_types` (a graph's mq op types)."""
    return ([qlinear_function(opset)] if OP_QLINEAR in op_types else []) + \
        ([dynamic_qlinear_function(opset)] if OP_DYNAMIC in op_types else [])


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return a
    return None


def fuse(nodes: list, inits) -> tuple[list, int]:
    """`nodes` (a graph's NodeProtos in order) with every QDQ int8 linear and int8 head pattern as one
    mq::QLinear / mq::DynamicQLinear node, placed where the pattern's last node was. Only exact patterns
    whose intermediate values nothing else reads: a per-tensor scalar activation scale and zero point, a
    rank-2 int8 weight initializer with per-output-channel scales on axis 1 and K < MAX_K (where a quant point
    has per-group scales, or a weight is int4 or wider, the nodes stay as they are). inits: the graph's
    initializers (TensorProtos; only names, types and dims are read). Returns (nodes, how many linears were fused)."""
    from onnx import TensorProto
    from onnx import helper as h

    from mq_deploy.export.surgery import iter_nodes

    meta = {t.name: (t.data_type, tuple(t.dims)) for t in inits}
    producer = {o: n for n in nodes for o in n.output}
    readers: dict = {}
    for top in nodes:       # with the nodes of their subgraphs (an MoE's If branches read outer values)
        subs = [a.g for a in top.attribute if a.HasField("g")] + [g for a in top.attribute for g in a.graphs]
        for n in [top] + [n for g in subs for n in iter_nodes(g)]:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1

    def made_by(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def only(name):
        return readers.get(name, 0) == 1

    def scalar(name, dtype):
        return meta.get(name) == (dtype, ())

    def channels(name, dtype, n):
        return meta.get(name) == (dtype, (n,))

    drop, replace = set(), {}
    for mm in nodes:
        if mm.op_type == "MatMul" and mm.domain in ("", "ai.onnx") and len(mm.input) == 2:
            dqa, dqw = made_by(mm.input[0], "DequantizeLinear"), made_by(mm.input[1], "DequantizeLinear")
            if (dqa is None or dqw is None or len(dqa.input) != 3 or len(dqw.input) != 3
                    or _attr(dqa, "axis") is not None):
                continue
            qa = made_by(dqa.input[0], "QuantizeLinear")
            if (qa is None or len(qa.input) != 3 or _attr(qa, "axis") is not None
                    or list(qa.input[1:]) != list(dqa.input[1:])):
                continue
            w, ws, wz = dqw.input
            wm = meta.get(w)
            axis = _attr(dqw, "axis")
            if (wm is None or wm[0] != TensorProto.INT8 or len(wm[1]) != 2 or wm[1][0] >= MAX_K
                    or axis is None or axis.i != 1
                    or not channels(ws, TensorProto.FLOAT, wm[1][1]) or not channels(wz, TensorProto.INT8, wm[1][1])
                    or not scalar(qa.input[1], TensorProto.FLOAT) or not scalar(qa.input[2], TensorProto.INT8)
                    or not (only(qa.output[0]) and only(dqa.output[0]) and only(dqw.output[0]))):
                continue
            drop.update(id(n) for n in (qa, dqa, dqw))
            replace[id(mm)] = h.make_node(OP_QLINEAR, [qa.input[0], qa.input[1], qa.input[2], w, ws, wz],
                                          [mm.output[0]], name=mm.name, domain=DOMAIN)
        elif mm.op_type == "Mul" and mm.domain in ("", "ai.onnx") and len(mm.input) == 2:
            cast, sc = made_by(mm.input[0], "Cast"), made_by(mm.input[1], "Mul")
            acc = made_by(cast.input[0], "MatMulInteger") if cast is not None else None
            if acc is None or sc is None or len(acc.input) != 4:
                continue
            dql = made_by(acc.input[0], "DynamicQuantizeLinear")
            if (dql is None or list(dql.output) != [acc.input[0], sc.input[0], acc.input[2]]
                    or _attr(cast, "to").i != TensorProto.FLOAT):
                continue
            w, wz, ws = acc.input[1], acc.input[3], sc.input[1]
            wm = meta.get(w)
            if (wm is None or wm[0] != TensorProto.INT8 or len(wm[1]) != 2 or wm[1][0] >= MAX_K
                    or not channels(ws, TensorProto.FLOAT, wm[1][1]) or not channels(wz, TensorProto.INT8, wm[1][1])
                    or not all(only(o) for o in (*dql.output, acc.output[0], cast.output[0], sc.output[0]))):
                continue
            drop.update(id(n) for n in (dql, acc, cast, sc))
            replace[id(mm)] = h.make_node(OP_DYNAMIC, [dql.input[0], w, ws, wz], [mm.output[0]], name=mm.name,
                                          domain=DOMAIN)
    out = [replace.get(id(n), n) for n in nodes if id(n) not in drop]
    return out, len(replace)
