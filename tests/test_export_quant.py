"""QDQ export: int8/int4 weights and static activation Q/DQ around the int8 mq::SelectiveScan, run in
ONNX Runtime with no plugin, against the fake-quantized PyTorch model (the reference it came from).

Tolerances. The float parts (norms, matmul accumulation order, the scan) differ between ORT and
PyTorch by ~1e-7 relative; where a value sits on a rounding boundary of an activation quantizer, that
difference flips it by one integer step, and a flip propagates through the recurrence. So the graph
is not bit-exact with fake quantization: we check the logits' mean cosine (>= 0.999), top-1 agreement
(>= 98 % on these 2-layer toy models; the samples are held to 99 % in the note) and that the integers
stored are exactly the checkpoint's grid (weights are rebuilt from them exactly).
"""

import numpy as np
import pytest
import torch

from mq_deploy.calib.collect import image_forward_loop, text_forward_loop
from mq_deploy.quant.fakequant import QuantConfig
from mq_deploy.quant.recipes import RecipeConfig, apply_recipe
from mq_deploy.verify.compare import compare_outputs

from helpers import ort_session, small_lm, small_vim

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TEXT = np.frombuffer(b"In the beginning God created the heaven and the earth. And the earth was without form, "
                     b"and void; and darkness was upon the face of the deep. " * 30, dtype=np.uint8)


def quantized_lm(recipe="mambaquant", wbits=8):
    m = small_lm(vocab=256, d_model=32, d_model2=32)
    scales = apply_recipe(m, text_forward_loop(TEXT, 64, 8), RecipeConfig(recipe, QuantConfig(wbits, 8)))
    return m, scales


def spec_of(scales, wbits, recipe):
    from mq_deploy.export.graph import QuantSpec

    return QuantSpec(wbits, 8, {k: float(v) for k, v in scales["act_scales"].items()}, scales["weight_scales"],
                     recipe)


def session(proto):
    onnx.checker.check_model(proto, full_check=True)
    return ort_session(proto.SerializeToString())


def text_ids(n, L, seed=0):
    r = np.random.default_rng(seed)
    starts = r.integers(0, len(TEXT) - L, n)
    return np.stack([TEXT[s:s + L] for s in starts]).astype(np.int64)


@pytest.mark.parametrize("recipe,wbits", [("mambaquant", 8), ("mambaquant", 4), ("rtn", 8), ("quarot", 8)])
def test_lm_qdq_graph_matches_fake_quant(recipe, wbits):
    from mq_deploy.export.graph import build_model

    m, scales = quantized_lm(recipe, wbits)
    proto = build_model(m, spec_of(scales, wbits, recipe))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("SelectiveScan") == 2 and "SelectiveScanFloat" not in ops
    wq = [t for t in proto.graph.initializer if t.name.startswith("wq")]
    assert wq and all(t.data_type == (onnx.TensorProto.INT4 if wbits == 4 else onnx.TensorProto.INT8) for t in wq)
    sess = session(proto)
    ids = text_ids(4, 48)
    got = sess.run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = m(torch.from_numpy(ids)).numpy()
    c = compare_outputs(got, want)
    assert c["cosine_mean"] >= 0.999 and c["top1_agreement"] >= 0.98, c


def test_vim_qdq_graph_matches_fake_quant():
    from mq_deploy.export.graph import build_model

    v = small_vim(stride=2, patch=4, img=10)
    images = torch.randn(24, 1, 10, 10)
    scales = apply_recipe(v, image_forward_loop(images, 8), RecipeConfig("mambaquant", QuantConfig(8, 8)))
    sess = session(build_model(v, spec_of(scales, 8, "mambaquant")))
    got = sess.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        want = v(images).numpy()
    c = compare_outputs(got, want)
    assert c["cosine_mean"] >= 0.999 and c["top1_agreement"] >= 0.95, c


def test_graph_size_does_not_depend_on_sequence_length():
    """One file serves L=16 and L=1024: the node count is fixed at export, and both lengths run."""
    from mq_deploy.export.graph import build_model

    m, scales = quantized_lm()
    spec = spec_of(scales, 8, "mambaquant")
    proto = build_model(m, spec)
    n_nodes = len(proto.graph.node)
    assert len(build_model(m, spec).graph.node) == n_nodes
    sess = session(proto)
    for L in (16, 1024):
        ids = np.resize(TEXT, (2, L)).astype(np.int64)
        out = sess.run(None, {"input_ids": ids})[0]
        assert out.shape == (2, L, 256) and np.isfinite(out).all()
    assert len(proto.graph.node) == n_nodes


@pytest.mark.parametrize("step", [False, True])
def test_consuming_build_gives_the_same_graph(step):
    """build_model(consume=True), what export uses to bound its memory, writes the same ModelProto and
    releases every residual block of the model it read."""
    import copy

    from mq_deploy.export.graph import build_model

    m, scales = quantized_lm()
    spec = spec_of(scales, 8, "mambaquant")
    want = build_model(m, spec, step=step)
    used = copy.deepcopy(m)
    got = build_model(used, spec, step=step, consume=True)
    assert got == want
    assert all(isinstance(layer, torch.nn.Identity) for layer in used.layers)
    assert not any(isinstance(layer, torch.nn.Identity) for layer in m.layers)


@pytest.mark.parametrize("quant", [False, True])
def test_step_graph_equals_full_graph(quant):
    """Prefill of a prompt, then one token a call, gives the full graph's logits at every position."""
    from mq_deploy.export.graph import build_model

    if quant:
        m, scales = quantized_lm()
        spec = spec_of(scales, 8, "mambaquant")
    else:
        m, spec = small_lm(vocab=256, d_model=32, d_model2=32), None
    full = session(build_model(m, spec))
    step = session(build_model(m, spec, step=True))
    ids = text_ids(2, 20, seed=3)
    want = full.run(None, {"input_ids": ids})[0]
    mc = m.cfg.mixer
    cs = np.zeros((m.cfg.n_layer, 2, mc.d_inner, mc.d_conv - 1), np.float32)
    ss = np.zeros((m.cfg.n_layer, 2, mc.d_inner, mc.d_state), np.float32)
    pre, cs, ss = step.run(None, {"input_ids": ids[:, :8], "conv_state": cs, "ssm_state": ss})
    outs = [pre]
    for t in range(8, 20):
        lg, cs, ss = step.run(None, {"input_ids": ids[:, t:t + 1], "conv_state": cs, "ssm_state": ss})
        outs.append(lg)
    got = np.concatenate(outs, axis=1)
    # the same float operations in the same order, except the conv's zero padding is explicit state here
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # and the PyTorch model's own decode state equals the graph's
    with torch.no_grad():
        _, states = m(torch.from_numpy(ids), return_state=True)
    np.testing.assert_allclose(ss, torch.stack([s for _, s in states]).numpy(), atol=1e-4 * np.abs(ss).max() + 1e-6)


def test_export_refuses_what_it_cannot_express():
    from mq_deploy.errors import MQUserError
    from mq_deploy.export.graph import QuantSpec, build_model

    with pytest.raises(MQUserError, match="8-bit activations"):
        QuantSpec(8, 16)
    with pytest.raises(MQUserError, match="decode-step"):
        build_model(small_vim(), None, step=True)


def test_files_exported_before_the_explicit_zero_points_still_run_exactly(tmp_path):
    """An export without the per-axis weight zero points (as mq-deploy wrote them before) runs in OrtRunner
    with the int8 MatMuls unfused (exact on every CPU), not with an ORT error."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.export.graph import build_model

    m, scales = quantized_lm("rtn", 8)
    proto = build_model(m, spec_of(scales, 8, "rtn"))
    zps = {t.name for t in proto.graph.initializer if t.name.startswith("w_zp")}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[2] in zps:
            del node.input[2]
    kept = [t for t in proto.graph.initializer if t.name not in zps]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    path = tmp_path / "old.onnx"
    onnx.save(proto, str(path))
    ids = text_ids(4, 48)
    got = OrtRunner(str(path), custom_op_library=False).infer({"input_ids": ids})["logits"]
    with torch.no_grad():
        want = m(torch.from_numpy(ids)).numpy()
    c = compare_outputs(got, want)
    print(c)
    assert c["cosine_mean"] >= 0.99999 and c["top1_agreement"] == 1.0, c
