"""The same inputs and seed give byte-identical artifacts (quantized weights and scales, ONNX), run
after run. Thread count changes float32 matmul blocking in calibration, so the manifest records it
(`depends_on.torch_threads`) with the versions; the wall-clock time lives only in the manifest."""

import hashlib
import json
import os

from mq_deploy.cli.main import main
from mq_deploy.models.io import save_model

from helpers import small_lm


def _sha(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_quantize_and_export_are_reproducible(tmp_path):
    lm = save_model(small_lm(vocab=256, d_model=32, d_model2=32), tmp_path / "lm")
    text = tmp_path / "t.txt"
    text.write_bytes(b"In the beginning God created the heaven and the earth. " * 80)
    digests = []
    for run in ("a", "b"):
        q, onnx = tmp_path / f"q{run}", tmp_path / f"m{run}.onnx"
        assert main(["quantize", str(lm), "-o", str(q), "--calib", str(text), "--calib-samples", "4",
                     "--threads", "2", "--seed", "3"]) == 0
        assert main(["export", str(q), "-o", str(onnx)]) == 0
        digests.append({name: _sha(q / name) for name in ("model.safetensors", "scales.safetensors", "config.json")}
                       | {"onnx": _sha(onnx)})
        manifest = json.loads((q / "manifest.json").read_text())
        assert manifest["depends_on"]["torch_threads"] == 2 and manifest["calibration"]["seed"] == 3
    assert digests[0] == digests[1]
    assert os.path.getsize(tmp_path / "ma.onnx") > 0
