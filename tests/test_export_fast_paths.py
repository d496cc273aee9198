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
from helpers import small_lm

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
    from mq_deploy.export.graph import hadamard_factors

    P, Q = hadamard_factors(torch.from_numpy(hadamard_matrix(n)).float())
    assert (P.shape[0], Q.shape[0]) == factors
    m = _rotation_model(n, "factored")
    sizes = sorted(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    # O(a^2 + q^2) weights, never n^2 (equal factors are one deduplicated constant)
    assert set(sizes) == {factors[0] ** 2, factors[1] ** 2} and len(sizes) <= 2
    y = np.random.default_rng(n).standard_normal((2, 5, n)).astype(np.float32)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"y": y})[0]
    dense = ort.InferenceSession(_rotation_model(n, "dense").SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"y": y})[0]
    ref = torch.from_numpy(y).double() @ torch.from_numpy(hadamard_matrix(n))
    e, e_dense = rel_err(torch.from_numpy(got), ref), rel_err(torch.from_numpy(dense), ref)
    print(f"n {n}: factored vs float64 ref {e:.2e}, dense vs float64 ref {e_dense:.2e}")
    assert e < 1e-6 and rel_err(torch.from_numpy(got), torch.from_numpy(dense)) < 1e-6


def test_non_hadamard_rotation_stays_dense():
    from mq_deploy.export.graph import hadamard_factors

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
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        outs[mode] = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        print(f"{recipe} {mode}: rel err vs PyTorch {rel_err(outs[mode], want):.2e}")
        assert rel_err(outs[mode], want) < 2e-5
