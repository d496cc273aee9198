"""Float32 ONNX export of our models runs in ONNX Runtime (function-body scan, no plugin) and matches
PyTorch. Tolerance 2e-5 relative: float32 both sides, different operation order."""

import numpy as np
import pytest
import torch

from mq_deploy.calib.collect import text_forward_loop
from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

from conftest import rel_err
from helpers import ort_session, small_lm, small_vim

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def session(model):
    from mq_deploy.export.graph import build_fp_model

    proto = build_fp_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 10 and {o.domain: o.version for o in proto.opset_import}[""] == 21
    return proto, ort_session(proto.SerializeToString())


@pytest.mark.parametrize("kw", [{}, {"bias": True, "conv_bias": False}])
def test_lm_export_matches_pytorch_at_any_length(kw):
    m = small_lm(vocab=256, **kw)
    proto, sess = session(m)
    n_nodes = len(proto.graph.node)
    for L in (1, 16, 1024):          # one graph, every length: its size does not depend on L
        ids = torch.randint(0, 256, (2, L))
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        with torch.no_grad():
            want = m(ids)
        assert rel_err(got, want) < 2e-5, L
    assert len(proto.graph.node) == n_nodes


def test_vim_export_matches_pytorch():
    v = small_vim(stride=2, patch=4, img=10)
    _, sess = session(v)
    x = torch.randn(5, 1, 10, 10)
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = v(x)
    assert rel_err(got, want) < 2e-5 and torch.equal(got.argmax(1), want.argmax(1))


def test_export_after_rotations_keeps_the_function():
    """QuaRot's folded rotations and its online Hadamard before out_proj export as weights and a MatMul."""
    m = small_lm(vocab=256, d_model=24, d_model2=24)
    text = np.frombuffer(b"Let there be light: and there was light. " * 40, dtype=np.uint8)
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        want = m(ids)
    apply_recipe(m, text_forward_loop(text, 32, 4), RecipeConfig("quarot"), quantize=False)
    _, sess = session(m)
    got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
    assert rel_err(got, want) < 2e-5
