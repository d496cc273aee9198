"""compare's bootstrap intervals, and the CLI flags of issue 13 (--bits w8a8..w8a4, --observer,
--weight-rounding) as a user meets them: JSON with intervals, one-line refusals of what cannot deploy."""

import json
import os

import numpy as np
import pytest
import torch

from mq_deploy.cli.main import main
from mq_deploy.models.io import save_model
from mq_deploy.quant.compare import bootstrap_indices, paired_stats

from conftest import LM_SAMPLE
from helpers import assert_user_error, small_lm

TEXT = b"Thou shalt love thy neighbour as thyself. And the second is like unto it. " * 60


@pytest.fixture
def lm_dir(tmp_path):
    return str(save_model(small_lm(vocab=256), tmp_path / "lm"))


def test_paired_bootstrap_interval_covers_the_truth_and_is_tighter_than_unpaired():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.normal(1.5, 0.5, n)                 # per-window bits: a wide spread across windows ...
    shifted = base + 0.01 + rng.normal(0, 0.002, n)  # ... a method 0.01 worse on every window
    one = np.ones(n)
    idx = bootstrap_indices(n, 1000, seed=1)
    st = paired_stats((shifted, one), (base, one), idx)
    lo, hi = st["delta_ci95"]
    print(f"delta {st['delta']:.5f} in [{lo:.5f}, {hi:.5f}]; value interval {st['ci95']}")
    assert lo < 0.01 < hi and 0 < lo                 # the paired interval resolves a 0.01 shift
    vlo, vhi = st["ci95"]
    assert vhi - vlo > 10 * (hi - lo)                # the value alone could not
    assert st["relative"] == pytest.approx(shifted.mean() / base.mean() - 1)


def test_compare_low_bits_json_carries_intervals_and_the_mambaquant_quarot_pair(tmp_path, capsys):
    # the trained sample, not a random model: on random weights (8.4 bits/byte) A4's cost is noise and the
    # ordering below would be a coin toss
    data = os.path.join(LM_SAMPLE, "data")
    out = tmp_path / "table.json"
    argv = ["compare", LM_SAMPLE, "--recipes", "quarot,mambaquant", "--bits", "w8a8,w8a4",
            "--calib", os.path.join(data, "calib.txt"), "--calib-samples", "2", "--data", os.path.join(data, "eval.txt"),
            "--limit", "3", "--seq-len", "128",
            "--observer", "minmax,heavy=mse", "--json", str(out)]
    assert main(argv) == 0
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert [(r["recipe"], r["bits"]) for r in rows] == [("fp", "fp"), ("quarot", "w8a8"), ("quarot", "w8a4"),
                                                        ("mambaquant", "w8a8"), ("mambaquant", "w8a4")]
    for r in rows[1:]:
        lo, hi = r["delta_ci95"]
        assert lo <= r["delta"] <= hi and r["ci95"][0] <= r["value"] <= r["ci95"][1]
        assert r["observer"] == "minmax,heavy=mse" and r["samples"] == 3
    assert rows[2]["delta"] > rows[1]["delta"]       # A4 costs more than A8
    assert [p["bits"] for p in table["pairs"]] == ["w8a8", "w8a4"]
    assert "mambaquant - quarot at w8a4" in capsys.readouterr().out


def test_cli_refuses_what_cannot_deploy_and_bad_specs(capsys, lm_dir, tmp_path):
    assert_user_error(capsys, ["quantize", lm_dir, "-o", tmp_path / "q", "--abits", "6"], "--abits", "6")
    assert_user_error(capsys, ["quantize", lm_dir, "-o", tmp_path / "q", "--observer", "minmax,q=mse"],
                      "--observer", "unknown quant point 'q'")
    assert_user_error(capsys, ["quantize", lm_dir, "-o", tmp_path / "q", "--weight-rounding", "awq"],
                      "--weight-rounding")
    assert_user_error(capsys, ["compare", lm_dir, "--bits", "w8a2"], "unknown bit width", "w8a4")
    assert not (tmp_path / "q").exists()


def test_gptq_checkpoint_through_quantize_export_and_ort(tmp_path, lm_dir):
    """`quantize --weight-rounding gptq --wbits 4` -> `export` -> ONNX Runtime agrees with the fake-quantized model."""
    pytest.importorskip("onnxruntime")
    from mq_deploy.backends.base import open_runner
    from mq_deploy.quant.qcheckpoint import load

    text = tmp_path / "t.txt"
    text.write_bytes(TEXT)
    q, onnx_path = tmp_path / "q", tmp_path / "m.onnx"
    assert main(["quantize", lm_dir, "--wbits", "4", "--weight-rounding", "gptq", "--observer", "mse-out",
                 "--calib", str(text), "--calib-samples", "3", "-o", str(q)]) == 0
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["weight_rounding"] == "gptq" and manifest["observer"] == "mse-out"
    assert main(["export", str(q), "-o", str(onnx_path)]) == 0
    ids = np.frombuffer(TEXT[:256], dtype=np.uint8).astype(np.int64).reshape(4, 64)
    got = open_runner(str(onnx_path)).infer({"input_ids": ids})["logits"]
    with torch.no_grad():
        want = load(str(q)).model(torch.from_numpy(ids)).numpy()
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    cos = float(np.mean(np.sum(got * want, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)))
    print(f"GPTQ W4A8 export vs fake quant: cosine {cos:.6f}, top-1 agreement {agree:.4f}")
    assert cos >= 0.999 and agree >= 0.98
