"""FalconMamba through the pipeline: the offline transforms still preserve the function across the
dt/B/C norms (float64, 1e-10), B/C smoothing is skipped (it would not), and the exported graph -- FP
and QDQ, full and decode step -- carries the norms and runs in ONNX Runtime.

Tolerances: FP graph vs PyTorch 1e-4 relative (float32, different summation order); QDQ graph vs
the fake-quantized model as in test_export_quant (cosine >= 0.999, top-1 agreement >= 0.98, since
rounding-boundary flips propagate through the recurrence).
"""

import numpy as np
import pytest
import torch

from mq_deploy.calib.collect import text_forward_loop
from mq_deploy.models.loaders import load_model
from mq_deploy.quant.fakequant import QuantConfig
from mq_deploy.quant.recipes import RecipeConfig, apply_recipe
from mq_deploy.verify.compare import compare_outputs

from conftest import rel_err
from helpers import ort_session

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

IDS = np.random.default_rng(0).integers(0, 61, 2000)


@pytest.fixture
def falcon_dir(tmp_path):
    cfg = transformers.FalconMambaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, state_size=8,
                                         mixer_rms_eps=1e-6)
    m = transformers.FalconMambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(tmp_path / "falcon")
    return str(tmp_path / "falcon")


@pytest.mark.parametrize("recipe", ["smoothquant", "quarot", "mambaquant"])
def test_transforms_preserve_falcon_in_float64(falcon_dir, recipe):
    loaded = load_model(falcon_dir)
    m = loaded.model.double()
    ids = torch.from_numpy(IDS[:60].reshape(2, 30))
    with torch.no_grad():
        want = m(ids)
    apply_recipe(m, text_forward_loop(IDS, 32, 4), RecipeConfig(recipe, QuantConfig(8, 8)), quantize=False)
    with torch.no_grad():
        e = rel_err(m(ids), want)
    print(f"{recipe}: rel err after the transforms {e:.2e}")
    assert e < 1e-10


def _session(proto):
    onnx.checker.check_model(proto, full_check=True)
    return ort_session(proto.SerializeToString())


def test_fp_export_carries_the_norms(falcon_dir):
    from mq_deploy.export.graph import build_model

    loaded = load_model(falcon_dir)
    proto = build_model(loaded.model)
    # per layer: block norm + 3 mixer norms; + norm_f
    assert [n.op_type for n in proto.graph.node].count("ReduceMean") == 2 * 4 + 1
    ids = IDS[:48].reshape(2, 24)
    got = _session(proto).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = loaded.model(torch.from_numpy(ids)).numpy()
    e = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"FP graph vs PyTorch rel err {e:.2e}")
    assert e <= 1e-4


def test_qdq_export_full_and_step(falcon_dir):
    from mq_deploy.export.exporter import quant_spec
    from mq_deploy.export.graph import QuantSpec, build_model

    loaded = load_model(falcon_dir)
    m = loaded.model
    scales = apply_recipe(m, text_forward_loop(IDS, 64, 8), RecipeConfig("mambaquant", QuantConfig(8, 8)))
    spec = QuantSpec(8, 8, {k: float(v) for k, v in scales["act_scales"].items()}, scales["weight_scales"],
                     "mambaquant")
    ids = IDS[100:196].reshape(2, 48)
    with torch.no_grad():
        want = m(torch.from_numpy(ids)).numpy()
    got = _session(build_model(m, spec)).run(None, {"input_ids": ids})[0]
    c = compare_outputs(got, want)
    print(f"QDQ full graph: cosine {c['cosine_mean']:.6f} top-1 {c['top1_agreement']:.3f}")
    assert c["cosine_mean"] >= 0.999 and c["top1_agreement"] >= 0.98
    step = _session(build_model(m, spec, step=True))
    md = m.cfg.mixer
    cs = np.zeros((2, 2, md.d_inner, md.d_conv - 1), np.float32)
    ss = np.zeros((2, 2, md.d_inner, md.d_state), np.float32)
    outs = []
    for t in range(ids.shape[1]):
        logits, cs, ss = step.run(None, {"input_ids": ids[:, t:t + 1], "conv_state": cs, "ssm_state": ss})
        outs.append(logits)
    c = compare_outputs(np.concatenate(outs, 1), want)
    print(f"QDQ decode steps: cosine {c['cosine_mean']:.6f} top-1 {c['top1_agreement']:.3f}")
    assert c["cosine_mean"] >= 0.999 and c["top1_agreement"] >= 0.98
    assert quant_spec(loaded) is None   # (a float folder: export of it is the FP graph)
