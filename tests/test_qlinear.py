"""mq::QLinear and mq::DynamicQLinear (mq_deploy/export/qlinear_op.py; the native kernel in
plugins/selective_scan/ort/qlinear.cpp) against their contracts, computed here in numpy from the integers.

Three runs of each node: the AVX-512 VNNI kernel (where this CPU has it; the library registers the ops only
there), the plain-loop kernel (MQ_ORT_QLINEAR=ref: qlinear_block_ref, the fast path's reference) and the
function bodies (MQ_ORT_QLINEAR=0: ONNX Runtime inlines them and runs its own int8 kernels).

Tolerances: both native kernels sum the integer products exactly and scale once, float(acc) * (x_scale *
w_scale[n]) in float32, as the numpy contract does: bitwise equal. The bodies through ONNX Runtime: 1e-5 of the
largest |y| (its int8 kernels scale the same exact sums; a float MatMul on dequantized values would round its
sums). Inputs reach the edges: activation codes saturating at -128 and 127, weight codes -128 and 127, K not a
multiple of 4, N not a multiple of 16 or 64, row counts around the kernel's groups of 4 and tasks of 64."""


import numpy as np
import pytest

from helpers import ort_lib_marker

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
LIB, needs_lib = ort_lib_marker()
pytestmark = needs_lib

SHAPES = [(1, 768, 3072), (1, 1, 1), (3, 7, 17), (4, 64, 50), (5, 130, 64), (70, 33, 130), (9, 1536, 80)]


def _model(kind, K, N, w, ws, rank=2, const_w=True):
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from mq_deploy.export import qlinear_op
    from mq_deploy.export.scan_op import DOMAIN

    lead = ["b", "m"][:rank - 1]
    inits = [nh.from_array(ws, "ws"), nh.from_array(np.zeros(N, np.int8), "wz")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, lead + ["k"])]   # K symbolic: the op checks it
    if const_w:
        inits.append(nh.from_array(w, "w"))
    else:
        inputs.append(h.make_tensor_value_info("w", T.INT8, [K, N]))
    if kind == "static":
        inputs.append(h.make_tensor_value_info("xs", T.FLOAT, []))
        inputs.append(h.make_tensor_value_info("xz", T.INT8, []))
        node = h.make_node(qlinear_op.OP_QLINEAR, ["x", "xs", "xz", "w", "ws", "wz"], ["y"], domain=DOMAIN)
    else:
        node = h.make_node(qlinear_op.OP_DYNAMIC, ["x", "w", "ws", "wz"], ["y"], domain=DOMAIN)
    g = h.make_graph([node], "g", inputs, [h.make_tensor_value_info("y", T.FLOAT, lead + [N])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)],
                     functions=qlinear_op.functions({qlinear_op.OP_QLINEAR, qlinear_op.OP_DYNAMIC}))
    m.ir_version = 10
    return m.SerializeToString()


def _set_mode(mode, monkeypatch):
    """mode: "fast" (the default registration), "ref" or "bodies" (MQ_ORT_QLINEAR=ref / 0), read when the library
    registers its ops (a session's options)."""
    if mode == "fast":
        monkeypatch.delenv("MQ_ORT_QLINEAR", raising=False)
    else:
        monkeypatch.setenv("MQ_ORT_QLINEAR", "ref" if mode == "ref" else "0")


def _session(model, mode, monkeypatch, threads=2):
    from mq_deploy.backends.ort.runner import session_options

    _set_mode(mode, monkeypatch)
    so = session_options(threads, spin=False, custom_op_library=LIB)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _fast_registered(monkeypatch) -> bool:
    """whether the default registration offers mq::QLinear here (a graph without the body loads)"""
    m = onnx.load_from_string(_model("static", 4, 16, np.zeros((4, 16), np.int8), np.ones(16, np.float32)))
    del m.functions[:]
    try:
        _session(m.SerializeToString(), "fast", monkeypatch)
        return True
    except Exception:
        return False


def _modes(monkeypatch):
    modes = ["ref", "bodies"]
    if _fast_registered(monkeypatch):
        modes.insert(0, "fast")
    else:
        print("mq::QLinear's fast kernel is not registered on this CPU (no AVX-512 VNNI): reference and bodies only")
    return modes


def _data(M, K, N, seed, lead=None):
    g = np.random.default_rng(seed)
    w = g.integers(-128, 128, (K, N)).astype(np.int8)
    w.flat[0], w.flat[-1] = -128, 127
    ws = (g.random(N) * 0.02 + 1e-3).astype(np.float32)
    x = (g.standard_normal((M, K)) * 3).astype(np.float32)
    x.flat[0], x.flat[-1] = 1e3, -1e3                  # saturate at 127 and -128
    return x.reshape(*(lead or [M]), K), w, ws


def _static_want(x, xs, w, ws):
    q = np.clip(np.rint(x.astype(np.float32) / np.float32(xs)), -128, 127).astype(np.int64)
    acc = q @ w.astype(np.int64)
    return acc.astype(np.float32) * (np.float32(xs) * ws)


def _dynamic_want(x, w, ws):
    x = x.astype(np.float32)
    lo, hi = min(np.float32(0), x.min()), max(np.float32(0), x.max())
    s = np.float32(1) if hi == lo else np.float32((hi - lo) / np.float32(255))
    zp = np.float32(np.rint(np.clip(np.float32(0) - lo / s, 0, 255)))
    u = np.clip(np.rint(x / s) + zp, 0, 255).astype(np.int64)
    acc = (u - zp.astype(np.int64)) @ w.astype(np.int64)
    return acc.astype(np.float32) * (s * ws)


def _check(got, want, mode, what):
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    print(f"{what} {mode}: max |diff| / max |y| = {err:.2e}")
    if mode == "bodies":
        assert err <= 1e-5, (what, mode, err)
    else:
        assert np.array_equal(got, want), (what, mode, err)


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_qlinear_equals_the_integer_contract(M, K, N, monkeypatch):
    x, w, ws = _data(M, K, N, seed=M * 1000 + K + N)
    xs = np.float32(0.02)
    want = _static_want(x, xs, w, ws)
    model = _model("static", K, N, w, ws)
    for mode in _modes(monkeypatch):
        got = _session(model, mode, monkeypatch).run(None, {"x": x, "xs": np.array(xs, np.float32), "xz": np.array(0, np.int8)})[0]
        _check(got, want, mode, f"QLinear {M}x{K}x{N}")


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("sign", ["mixed", "positive", "negative"])
def test_dynamic_qlinear_equals_the_integer_contract(M, K, N, sign, monkeypatch):
    x, w, ws = _data(M, K, N, seed=M + K * 7 + N)
    x = {"mixed": x, "positive": np.abs(x), "negative": -np.abs(x)}[sign]
    want = _dynamic_want(x, w, ws)
    model = _model("dynamic", K, N, w, ws)
    for mode in _modes(monkeypatch):
        got = _session(model, mode, monkeypatch).run(None, {"x": x})[0]
        _check(got, want, mode, f"DynamicQLinear {sign} {M}x{K}x{N}")


def test_zero_input_batch_dims_and_a_weight_fed_at_run_time(monkeypatch):
    """all-zero x (DynamicQuantizeLinear's scale 1, zero point 0: y = 0); x of rank 3; the weight as a graph
    input (not a constant: repacked on every call) gives what the constant gives"""
    M, K, N = 6, 40, 70
    x, w, ws = _data(M, K, N, seed=3, lead=[2, 3])
    xs = np.float32(0.05)
    for mode in _modes(monkeypatch):
        y = _session(_model("dynamic", K, N, w, ws, rank=3), mode, monkeypatch).run(None, {"x": np.zeros_like(x)})[0]
        assert y.shape == (2, 3, N) and not y.any()
        feeds = {"x": x, "xs": np.array(xs, np.float32), "xz": np.array(0, np.int8)}
        const = _session(_model("static", K, N, w, ws, rank=3), mode, monkeypatch).run(None, feeds)[0]
        fed = _session(_model("static", K, N, w, ws, rank=3, const_w=False), mode, monkeypatch).run(
            None, {**feeds, "w": w})[0]
        assert const.shape == (2, 3, N)
        _check(const, _static_want(x.reshape(M, K), xs, w, ws).reshape(2, 3, N), mode, "rank 3")
        assert np.array_equal(fed, const), mode


@pytest.mark.parametrize("bad,needle", [({"xz": np.array(3, np.int8)}, "x_zero_point must be 0"),
                                        ({"xs": np.array(0, np.float32)}, "x_scale must be finite and > 0"),
                                        ({"x": np.zeros((2, 9), np.float32)}, "x's last dimension must be w's K = 8")])
def test_bad_inputs_fail_with_one_line(bad, needle, monkeypatch):
    """what the native kernel refuses (the function bodies, ONNX Runtime's own ops, fail or differ in their own
    ways): a non-zero activation zero point, a scale that is not finite and > 0, x that does not fit w"""
    w, ws = np.ones((8, 16), np.int8), np.ones(16, np.float32)
    feeds = {"x": np.ones((2, 8), np.float32), "xs": np.array(0.1, np.float32), "xz": np.array(0, np.int8), **bad}
    for mode in [m for m in _modes(monkeypatch) if m != "bodies"]:
        sess = _session(_model("static", 8, 16, w, ws), mode, monkeypatch)
        with pytest.raises(Exception) as e:
            sess.run(None, feeds)
        assert needle in str(e.value), (mode, str(e.value))


def test_step_graph_fuses_its_int8_linears_and_runs_the_same_three_ways(tmp_path, monkeypatch):
    """a tiny LM quantized W8A8 with an int8 head, exported as a decode-step graph: every in_proj / out_proj and
    the head as mq::QLinear / mq::DynamicQLinear (no QDQ MatMul or MatMulInteger left), its full graph untouched;
    decoding gives the same logits with the fast kernel, the reference kernel (bitwise) and the function bodies"""
    import json

    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.cli.main import main
    from mq_deploy.export import qlinear_op
    from mq_deploy.models.io import save_model

    from helpers import small_lm

    text = tmp_path / "text.txt"
    text.write_bytes(b"In the beginning God created the heaven and the earth. " * 30)
    lm = str(save_model(small_lm(vocab=256, d_model=32, d_model2=32), str(tmp_path / "fp")))
    q, step, full = (str(tmp_path / n) for n in ("q", "step.onnx", "full.onnx"))
    assert main(["quantize", lm, "-o", q, "--calib", str(text), "--calib-samples", "4"]) == 0
    assert main(["export", q, "-o", step, "--decode-step", "--quantize-head"]) == 0
    assert main(["export", q, "-o", full, "--quantize-head"]) == 0
    m = onnx.load(step)
    ops = [n.op_type for n in m.graph.node]
    cfg = json.loads({p.key: p.value for p in m.metadata_props}["mq.config"])
    assert ops.count(qlinear_op.OP_QLINEAR) == 2 * cfg["n_layer"], ops
    assert ops.count(qlinear_op.OP_DYNAMIC) == 1
    assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    assert {f.name for f in m.functions} >= {qlinear_op.OP_QLINEAR, qlinear_op.OP_DYNAMIC}
    full_ops = {n.op_type for n in onnx.load(full).graph.node}
    assert "MatMulInteger" in full_ops and not full_ops & {qlinear_op.OP_QLINEAR, qlinear_op.OP_DYNAMIC}

    ids = np.random.default_rng(0).integers(0, 256, (2, 9)).astype(np.int64)
    out = {}
    for mode in _modes(monkeypatch):
        _set_mode(mode, monkeypatch)
        dec = OrtRunner(step).decoder(2)
        logits = [dec.prefill(ids)]
        for _ in range(6):
            logits.append(dec.step(logits[-1].argmax(-1)))
        out[mode] = np.stack(logits)
    for mode, got in out.items():
        _check(got, out["ref"], mode, "decode")

    # an edited file: a zero or NaN weight scale, a negative activation scale of one node, refused in one line
    # when the runner opens it (the function bodies would run them silently)
    from mq_deploy.errors import MQUserError

    for op, index, value in ((qlinear_op.OP_QLINEAR, 4, 0.0), (qlinear_op.OP_DYNAMIC, 2, float("nan")),
                             (qlinear_op.OP_QLINEAR, 1, -0.5)):
        edited = onnx.load(step)
        name = next(n for n in edited.graph.node if n.op_type == op).input[index]
        t = next(t for t in edited.graph.initializer if t.name == name)
        arr = onnx.numpy_helper.to_array(t).copy()
        arr.flat[0] = value
        t.CopyFrom(onnx.numpy_helper.from_array(arr, name))
        bad = str(tmp_path / f"edited_{op}_{index}.onnx")
        onnx.save(edited, bad)
        with pytest.raises(MQUserError) as e:
            OrtRunner(bad)
        assert f"the scale {name} of a {op} node holds" in str(e.value) and "\n" not in str(e.value)


def test_fuse_leaves_what_is_not_the_exact_pattern():
    """qlinear_op.fuse rewrites a QDQ linear only when nothing else reads its intermediate values, its activation
    scale is one per tensor and its weight int8 [K, N] (K < MAX_K) with per-channel scales on axis 1"""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from mq_deploy.export import qlinear_op

    K, N = 8, 4
    inits = [nh.from_array(np.ones((K, N), np.int8), "w"), nh.from_array(np.ones(N, np.float32), "ws"),
             nh.from_array(np.zeros(N, np.int8), "wz"), nh.from_array(np.array(0.1, np.float32), "s"),
             nh.from_array(np.array(0, np.int8), "z"), nh.from_array(np.full(K, 0.1, np.float32), "sk"),
             nh.from_array(np.zeros(K, np.int8), "zk"), h.make_tensor("w4", T.INT4, (K, N), [1] * (K * N)),
             nh.from_array(np.ones((qlinear_op.MAX_K, N), np.int8), "wide")]

    def linear(w="w", s="s", z="z", **qattrs):
        return [h.make_node("QuantizeLinear", ["x", s, z], ["q"], **qattrs),
                h.make_node("DequantizeLinear", ["q", s, z], ["d"], **qattrs),
                h.make_node("DequantizeLinear", [w, "ws", "wz"], ["wd"], axis=1),
                h.make_node("MatMul", ["d", "wd"], ["y"])]

    nodes, n = qlinear_op.fuse(linear(), inits)
    assert n == 1 and [x.op_type for x in nodes] == ["QLinear"] and list(nodes[0].output) == ["y"]
    for case in (linear() + [h.make_node("Relu", ["d"], ["other"])],      # the dequantized activation read twice
                 linear(s="sk", z="zk", axis=-1),                          # per-channel activation scales
                 linear(w="w4"),                                           # an int4 weight
                 linear(w="wide")):                                        # K past the kernel's exact sums
        nodes, n = qlinear_op.fuse(case, inits)
        assert n == 0 and [x.op_type for x in nodes] == [x.op_type for x in case]
