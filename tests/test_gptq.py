"""GPTQ: the blocked fast path equals the textbook column loop, lands on RTN's per-channel grid, beats RTN
on the layer output it minimises, and a GPTQ checkpoint exports to the same int4 grid ONNX Runtime runs."""

import numpy as np
import pytest
import torch

from mq_deploy.ops.quant import weight_scales
from mq_deploy.quant.gptq import gptq_quantize, gptq_quantize_ref

from helpers import ort_session


def correlated(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix * torch.linspace(0.2, 3, d, dtype=torch.float64)


@pytest.mark.parametrize("bits", [4, 8])
def test_blocked_gptq_equals_reference_and_stays_on_the_grid(bits):
    X = correlated(600, 48)
    H = X.t() @ X / len(X)
    w = torch.randn(20, 48, generator=torch.Generator().manual_seed(1))
    s = weight_scales(w, bits)
    ref = gptq_quantize_ref(w, H, bits, s)
    fast = gptq_quantize(w, H, bits, s, block=16)
    print(f"W{bits}: max |fast - ref| = {(fast - ref).abs().max():.3e}")
    assert torch.equal(fast, ref)        # same arithmetic up to float64 summation order, then rounding
    q = fast.double() / s.double()[:, None]
    assert torch.allclose(q, q.round(), atol=1e-4) and q.round().abs().max() <= 2 ** (bits - 1) - 1


def test_gptq_beats_rtn_on_the_layer_output():
    from mq_deploy.ops.quant import fake_quantize

    X = correlated(2000, 64, seed=2)
    H = X.t() @ X / len(X)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = weight_scales(w, 4)
    rtn = fake_quantize(w, s.double(), 4, axis=0)
    gq = gptq_quantize(w, H, 4, s)
    e_rtn, e_gptq = ((X @ (rtn - w).t()) ** 2).mean().item(), ((X @ (gq - w).t()) ** 2).mean().item()
    print(f"W4 output mse: RTN {e_rtn:.4e}, GPTQ {e_gptq:.4e} ({e_gptq / e_rtn:.2f}x)")
    assert e_gptq < 0.8 * e_rtn


TEXT = np.frombuffer(b"In the beginning God created the heaven and the earth. And the earth was without form, "
                     b"and void; and darkness was upon the face of the deep. " * 30, dtype=np.uint8)


def test_gptq_checkpoint_exports_on_the_same_int4_grid_and_runs_in_ort():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import copy

    from onnx import numpy_helper

    from mq_deploy.calib.collect import text_forward_loop
    from mq_deploy.export.graph import QuantSpec, build_model
    from mq_deploy.quant.fakequant import QuantConfig
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe
    from mq_deploy.verify.compare import compare_outputs

    from helpers import small_lm

    m = small_lm(vocab=256, d_model=32, d_model2=32)
    rtn = copy.deepcopy(m)
    loop = text_forward_loop(TEXT, 64, 8)
    scales = apply_recipe(m, loop, RecipeConfig("mambaquant", QuantConfig(4, 8), weight_rounding="gptq"))
    apply_recipe(rtn, loop, RecipeConfig("mambaquant", QuantConfig(4, 8)))
    w_g, w_r = m.layers[0].mixer.in_proj.weight, rtn.layers[0].mixer.in_proj.weight
    assert not torch.equal(w_g, w_r)                       # GPTQ chose other integers ...
    s = scales["weight_scales"]["layers.0.mixer.in_proj.weight"]
    assert torch.equal(s, weight_scales(w_r, 4))           # ... on RTN's grid
    spec = QuantSpec(4, 8, {k: float(v) for k, v in scales["act_scales"].items()}, scales["weight_scales"], "mambaquant")
    proto = build_model(m, spec)
    onnx.checker.check_model(proto, full_check=True)
    ints = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert ints
    # the exporter refuses a weight off its grid (MQInternalError); in_proj's integers are GPTQ's, stored [in, out]
    q_in_proj = torch.round(w_g.detach().double() / s.double()[:, None]).t()
    assert q_in_proj.abs().max() <= 7
    assert any(np.array_equal(numpy_helper.to_array(t).astype(np.int64), q_in_proj.numpy().astype(np.int64))
               for t in ints if tuple(t.dims) == tuple(q_in_proj.shape))
    sess = ort_session(proto.SerializeToString())
    ids = np.stack([TEXT[i:i + 48] for i in (0, 100, 200, 300)]).astype(np.int64)
    got = sess.run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = m(torch.from_numpy(ids)).numpy()
    c = compare_outputs(got, want)
    print({k: c[k] for k in ("cosine_mean", "top1_agreement")})
    assert c["cosine_mean"] >= 0.999 and c["top1_agreement"] >= 0.98, c
