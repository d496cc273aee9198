"""Export fast paths against their references: the factored online Hadamard (two small MatMuls in place of
the dense [n, n] product) and the int8 LM head (--quantize-head).

Tolerances (rel_err = max |diff| / max |ref|):
  factored vs dense rotation: 1e-6. Both are float32 sums of the same +-1/sqrt(n) products, in another
  order (n terms vs a + q terms): a few ulps of the largest output.
  exported graph vs PyTorch: 2e-5, as in test_export_graph (float32 both sides, different op order).
"""

import numpy as np
import pytest
import torch

from mq_deploy.calib.collect import text_forward_loop
from mq_deploy.ops.hadamard import hadamard_matrix
from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

from conftest import rel_err
from helpers import ort_session, small_lm

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TEXT = np.frombuffer(b"Let there be light: and there was light. " * 40, dtype=np.uint8)


def _rotation_model(n, mode):
    """A graph y [b, L, n] -> y @ H_n, as the exporter writes it."""
    from onnx import TensorProto as T
    from onnx import helper

    from mq_deploy.export.graph import OPSET, _Builder, _online_rotation

    b = _Builder(OPSET)
    out = _online_rotation(b, "y", torch.from_numpy(hadamard_matrix(n)).float(), mode)
    b.nodes.append(helper.make_node("Identity", [out], ["out"]))
    g = helper.make_graph(b.nodes, "rot", [helper.make_tensor_value_info("y", T.FLOAT, ["b", "L", n])],
                          [helper.make_tensor_value_info("out", T.FLOAT, ["b", "L", n])], initializer=b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("n,factors", [(1536, (32, 48)), (384, (16, 24)), (48, (4, 12)), (64, (8, 8))])
def test_factored_hadamard_equals_the_dense_product(n, factors):
    from mq_deploy.ops.hadamard import hadamard_factors

    P, Q = hadamard_factors(torch.from_numpy(hadamard_matrix(n)).float())
    assert (P.shape[0], Q.shape[0]) == factors
    m = _rotation_model(n, "factored")
    sizes = sorted(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    # O(a^2 + q^2) weights, never n^2 (equal factors are one deduplicated constant)
    assert set(sizes) == {factors[0] ** 2, factors[1] ** 2} and len(sizes) <= 2
    y = np.random.default_rng(n).standard_normal((2, 5, n)).astype(np.float32)
    got = ort_session(m.SerializeToString()).run(None, {"y": y})[0]
    dense = ort.InferenceSession(_rotation_model(n, "dense").SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"y": y})[0]
    ref = torch.from_numpy(y).double() @ torch.from_numpy(hadamard_matrix(n))
    e, e_dense = rel_err(torch.from_numpy(got), ref), rel_err(torch.from_numpy(dense), ref)
    print(f"n {n}: factored vs float64 ref {e:.2e}, dense vs float64 ref {e_dense:.2e}")
    assert e < 1e-6 and rel_err(torch.from_numpy(got), torch.from_numpy(dense)) < 1e-6


def test_non_hadamard_rotation_stays_dense():
    from mq_deploy.ops.hadamard import hadamard_factors

    R = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64))[0]
    assert hadamard_factors(R) is None
    assert hadamard_factors(torch.from_numpy(hadamard_matrix(12))) is None   # Paley 12: no factor
    H = torch.from_numpy(hadamard_matrix(48))
    assert hadamard_factors(H * -1) is None   # same size, not the recipes' matrix


@pytest.mark.parametrize("recipe", ["quarot", "mambaquant"])
def test_rotated_lm_exports_factored_and_matches_pytorch(recipe):
    from mq_deploy.export.graph import build_model

    m = small_lm(vocab=256, d_model=24, d_model2=24)      # d_inner 48 = 4 x 12
    apply_recipe(m, text_forward_loop(TEXT, 32, 4), RecipeConfig(recipe), quantize=False)
    assert m.layers[0].mixer.out_rotation is not None
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        want = m(ids)
    outs = {}
    for mode in ("factored", "dense"):
        proto = build_model(m, rotation=mode)
        onnx.checker.check_model(proto, full_check=True)
        n_big = sum(1 for t in proto.graph.initializer if list(t.dims) == [48, 48])
        assert n_big == (0 if mode == "factored" else 1), mode
        sess = ort_session(proto.SerializeToString())
        outs[mode] = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        print(f"{recipe} {mode}: rel err vs PyTorch {rel_err(outs[mode], want):.2e}")
        assert rel_err(outs[mode], want) < 2e-5


# ---- int8 LM head -----------------------------------------------------------------------------------

def test_dynamic_quantize_reference_matches_onnx():
    """fakequant.dynamic_quantize_linear_ref against ORT's DynamicQuantizeLinear: identical codes, scale
    and zero point (exact: same float32 formula, round half to even)."""
    from onnx import TensorProto as T
    from onnx import helper

    from mq_deploy.quant.fakequant import dynamic_quantize_linear_ref

    g = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "dq",
                          [helper.make_tensor_value_info("x", T.FLOAT, ["n"])],
                          [helper.make_tensor_value_info("q", T.UINT8, ["n"]),
                           helper.make_tensor_value_info("s", T.FLOAT, []),
                           helper.make_tensor_value_info("z", T.UINT8, [])])
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)],
                                                  ir_version=10).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    for seed, shift in ((0, 0.0), (1, 3.0), (2, -2.0)):
        x = (torch.randn(4000, generator=torch.Generator().manual_seed(seed)) + shift)
        q, s, z = sess.run(None, {"x": x.numpy()})
        rq, rs, rz = dynamic_quantize_linear_ref(x)
        n_diff = int((torch.from_numpy(q.astype(np.int64)) != rq.long()).sum())
        print(f"shift {shift}: scale {float(s):.6g} vs {float(rs):.6g}, zp {int(z)} vs {int(rz)}, codes differing {n_diff}")
        assert float(s) == float(rs) and int(z) == int(rz) and n_diff == 0


@pytest.mark.parametrize("act", ["dynamic", "none"])
@pytest.mark.parametrize("step", [False, True])
def test_int8_head_export_matches_its_reference(act, step):
    """The exported int8 head equals fakequant.Int8Head (integer accumulation both sides; float32 rounding
    of the final scale: 2e-5 as the rest of the graph), and stays close to the float head it replaces.
    act "none" (DequantizeLinear -> MatMul): ORT >= 1.2x rewrites that pair into MatMulNBits (8 bits),
    which quantizes the activations blockwise itself, so the graph's own semantics are checked with ORT's
    optimizations off, and what users get (all optimizations) against the float head: 1e-2, the order of
    one int8 step of the activations (1/255 of their range) times the weights."""
    from mq_deploy.export.graph import build_model
    from mq_deploy.quant.fakequant import Int8Head, quantize_head

    m = small_lm(vocab=256, d_model=24, d_model2=24)    # tied embedding (the default)
    emb = m.embedding.weight.detach().clone()
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        want_fp = m(ids)
    quantize_head(m, act)
    assert isinstance(m.lm_head, Int8Head) and torch.equal(m.embedding.weight, emb)   # embedding untouched
    with torch.no_grad():
        want = m(ids)
    proto = build_model(m, step=step)
    onnx.checker.check_model(proto, full_check=True)
    kinds = {t.name: t.data_type for t in proto.graph.initializer}
    assert any(k.startswith("lm_head_q") and v == onnx.TensorProto.INT8 for k, v in kinds.items())
    assert not any(k.startswith("lm_head_") and list(t.dims) == [24, 256] and t.data_type == onnx.TensorProto.FLOAT
                   for k, t in ((t.name, t) for t in proto.graph.initializer))
    so = ort.SessionOptions()
    if act == "none":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort_session(proto.SerializeToString(), so)
    feeds = {"input_ids": ids.numpy()}
    if step:
        cfg = m.cfg.mixer
        feeds["conv_state"] = np.zeros((m.cfg.n_layer, 2, cfg.d_inner, cfg.d_conv - 1), np.float32)
        feeds["ssm_state"] = np.zeros((m.cfg.n_layer, 2, cfg.d_inner, cfg.d_state), np.float32)
    got = torch.from_numpy(sess.run(None, feeds)[0])
    e, e_fp = rel_err(got, want), rel_err(got, want_fp)
    agree = (got.argmax(-1) == want_fp.argmax(-1)).float().mean().item()
    print(f"act {act} step {step}: vs Int8Head {e:.2e}; vs float head {e_fp:.2e}, top-1 agreement {agree:.3f}")
    assert e < 2e-5
    assert e_fp < 1e-2
    if act == "none":
        opt = ort_session(proto.SerializeToString()).run(None, feeds)[0]
        e_opt = rel_err(torch.from_numpy(opt), want_fp)
        print(f"  optimized (MatMulNBits) vs float head {e_opt:.2e}")
        assert e_opt < 1e-2


def test_last_logits_step_graph_equals_the_last_position():
    from mq_deploy.export.graph import build_model

    m = small_lm(vocab=256, d_model=24, d_model2=24)
    ids = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        want = m(ids)[:, -1:]
    cfg = m.cfg.mixer
    feeds = {"input_ids": ids.numpy(),
             "conv_state": np.zeros((m.cfg.n_layer, 3, cfg.d_inner, cfg.d_conv - 1), np.float32),
             "ssm_state": np.zeros((m.cfg.n_layer, 3, cfg.d_inner, cfg.d_state), np.float32)}
    proto = build_model(m, step=True, last_logits=True)
    onnx.checker.check_model(proto, full_check=True)
    got = ort_session(proto.SerializeToString()).run(None, feeds)[0]
    assert got.shape == (3, 1, 256)
    assert rel_err(torch.from_numpy(got), want) < 2e-5


@pytest.mark.parametrize("wbits", [8, 4])
def test_small_weights_float_is_the_same_function_without_their_dequantize(wbits):
    """small_weights="float" stores conv1d / x_proj / dt_proj as q * s in float32, bitwise what their
    DequantizeLinear computes: with ORT's optimizations off both graphs give identical logits; with
    them on, only kernel choice differs (rel err < 1e-5). The other weights keep their int8/int4 + DQ."""
    from mq_deploy.export.graph import QuantSpec, build_model
    from mq_deploy.quant.fakequant import QuantConfig

    m = small_lm(vocab=256, d_model=24, d_model2=24)
    scales = apply_recipe(m, text_forward_loop(TEXT, 32, 4), RecipeConfig("mambaquant", QuantConfig(wbits, 8)))
    spec = QuantSpec(wbits, 8, {k: float(v) for k, v in scales["act_scales"].items()}, scales["weight_scales"],
                     "mambaquant")
    protos = {k: build_model(m, spec, step=True, fused_step=False, small_weights=k) for k in ("qdq", "float")}
    n_dq = {k: sum(1 for n in p.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("wq"))
            for k, p in protos.items()}
    assert n_dq["float"] == n_dq["qdq"] - 3 * m.cfg.n_layer, n_dq     # conv1d, x_proj, dt_proj per layer
    cfg = m.cfg.mixer
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, (2, 9)).astype(np.int64),
             "conv_state": np.random.default_rng(1).standard_normal((m.cfg.n_layer, 2, cfg.d_inner,
                                                                     cfg.d_conv - 1)).astype(np.float32),
             "ssm_state": np.zeros((m.cfg.n_layer, 2, cfg.d_inner, cfg.d_state), np.float32)}
    for level, tol in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 0.0),
                       (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 1e-5)):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        outs = {k: ort_session(p.SerializeToString(), so).run(None, feeds)
                for k, p in protos.items()}
        for i in range(3):
            e = rel_err(torch.from_numpy(outs["float"][i]), torch.from_numpy(outs["qdq"][i]))
            print(f"W{wbits} {level}: output {i} float vs qdq small weights {e:.2e}")
            assert e <= tol
