"""export / verify / generate / run as a user meets them, and the bad input each must refuse clearly."""

import json
import os

import numpy as np
import pytest

from mq_deploy.cli.main import main
from mq_deploy.models.io import save_model

from helpers import assert_user_error, small_lm, small_vim

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TEXT = b"And God said, Let there be light: and there was light. And God saw the light, that it was good. " * 40


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    text = d / "text.txt"
    text.write_bytes(TEXT)
    src = str(save_model(small_lm(vocab=256, d_model=32, d_model2=32), d / "fp"))
    q = str(d / "q")
    assert main(["quantize", src, "-o", q, "--calib", str(text), "--calib-samples", "4"]) == 0
    assert main(["export", q, "-o", str(d / "m.onnx")]) == 0
    assert main(["export", q, "-o", str(d / "step.onnx"), "--decode-step"]) == 0
    return {"dir": d, "text": str(text), "fp": src, "q": q, "onnx": str(d / "m.onnx"), "step": str(d / "step.onnx")}


def test_verify_passes_and_writes_json(lm, capsys):
    out = lm["dir"] / "v.json"
    code = main(["verify", lm["onnx"], "--reference", lm["q"], "--data", lm["text"], "--seq-len", "64", "--limit",
                 "8", "--json", str(out)])
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert set(rep) == {"mq_deploy_version", "outputs", "metrics", "checks", "passed", "verdict", "noise_floor"}
    assert code == 0 and rep["passed"] and "PASSED" in printed, printed
    o = rep["outputs"]["logits"]
    assert o["cosine_mean"] >= 0.999 and o["top1_agreement"] >= 0.99
    assert rep["metrics"]["metric"] == "bits_per_byte" and rep["metrics"]["rel_delta"] <= 0.002


def test_verify_fails_on_a_tolerance(lm, capsys):
    """An FP32 export is not the int8 model: a tight atol fails and verify exits 1."""
    fp_onnx = str(lm["dir"] / "fp.onnx")
    assert main(["export", lm["fp"], "-o", fp_onnx, "--overwrite"]) == 0
    code = main(["verify", fp_onnx, "--reference", lm["q"], "--data", lm["text"], "--seq-len", "64", "--limit", "4",
                 "--atol", "1e-6", "--check-error-stat", "max"])
    assert code == 1 and "FAILED" in capsys.readouterr().out
    # and against its own FP model it passes that same tolerance... to float32 rounding
    assert main(["verify", fp_onnx, "--reference", lm["fp"], "--data", lm["text"], "--seq-len", "64", "--limit", "4",
                 "--atol", "1e-4", "--check-error-stat", "max"]) == 0


def test_verify_step_graph(lm, capsys):
    assert main(["verify", lm["step"], "--reference", lm["q"], "--data", lm["text"], "--seq-len", "64", "--limit",
                 "4"]) == 0
    assert "ssm_state_out" in capsys.readouterr().out


def test_generate_matches_pytorch_greedy(lm, capsys):
    import torch

    from mq_deploy.quant.qcheckpoint import load

    out = lm["dir"] / "g.json"
    assert main(["generate", lm["step"], "--prompt", "And God said", "--max-new-tokens", "12", "--json",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("And God said")
    new = json.loads(out.read_text())["new_ids"]
    model = load(lm["q"]).model
    want = model.generate(torch.tensor([list(b"And God said")]), 12)[0].tolist()
    # greedy decoding: the int8 graph and the fake-quant model pick the same bytes (argmax margins here
    # are far above the rounding differences described in test_export_quant)
    assert sum(a == b for a, b in zip(new, want)) >= 11, (new, want)
    assert main(["generate", lm["step"], "--prompt-ids", "65,66", "--max-new-tokens", "3", "--ids"]) == 0
    assert len(capsys.readouterr().out.split()) == 3


def test_generate_needs_the_step_graph(lm, capsys):
    assert_user_error(capsys, ["generate", lm["onnx"], "--prompt", "x"], "decode-step")
    assert_user_error(capsys, ["generate", lm["step"]], "--prompt")
    assert_user_error(capsys, ["generate", lm["step"], "--prompt-ids", "1,999"], "[0, 256)")


def test_export_never_overwrites(lm, capsys):
    before = os.path.getmtime(lm["onnx"])
    assert_user_error(capsys, ["export", lm["q"], "-o", lm["onnx"]], "already exists", "--overwrite")
    assert os.path.getmtime(lm["onnx"]) == before
    assert_user_error(capsys, ["export", lm["q"], "-o", os.path.join(lm["q"], "model.safetensors"), "--overwrite"],
                      "input")
    assert_user_error(capsys, ["export", lm["q"], "-o", str(lm["dir"] / "x.onnx"), "--opset", "17"], "opset")
    from mq_deploy.cli.main import main

    assert main(["export", lm["q"], "-o", str(lm["dir"] / "nodir" / "x.onnx")]) == 0   # folders made as needed
    assert os.listdir(lm["dir"] / "nodir") == ["x.onnx"]
    assert not any(".mq-tmp-" in f for f in os.listdir(lm["dir"]))


def test_bad_onnx_files(lm, tmp_path, capsys):
    data = open(lm["onnx"], "rb").read()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model at all" * 10)
    for p in (trunc, garbage):
        assert_user_error(capsys, ["verify", str(p), "--reference", lm["q"]], str(p), "not a readable ONNX")
    assert_user_error(capsys, ["verify", str(tmp_path / "none.onnx"), "--reference", lm["q"]], "no such file")
    # the same graph without its function bodies and no plugin library (--no-native: not even the built one)
    m = onnx.load(lm["onnx"])
    del m.functions[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    assert_user_error(capsys, ["verify", str(bare), "--reference", lm["q"], "--no-native"], "mq::SelectiveScan",
                      "function body", "--custom-op-lib")


def test_wrong_feeds(lm):
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.errors import MQUserError

    r = OrtRunner(lm["onnx"])
    ids = np.zeros((1, 5), np.int64)
    with pytest.raises(MQUserError, match="missing input_ids; unknown tokens"):
        r.infer({"tokens": ids})
    with pytest.raises(MQUserError, match="must be int64, got float32"):
        r.infer({"input_ids": ids.astype(np.float32)})
    with pytest.raises(MQUserError, match="rank 2"):
        r.infer({"input_ids": ids[0]})
    s = OrtRunner(lm["step"])
    with pytest.raises(MQUserError, match="dimension 2 must be"):
        s.infer({"input_ids": ids, "conv_state": np.zeros((2, 1, 7, 3), np.float32),
                 "ssm_state": np.zeros((2, 1, 64, 16), np.float32)})


@pytest.fixture(scope="module")
def vim(tmp_path_factory):
    from mq_deploy.data.images import write_idx

    d = tmp_path_factory.mktemp("vim")
    data = d / "data"          # outputs go beside the data folder, never into it
    data.mkdir()
    rng = np.random.default_rng(0)
    write_idx(str(data / "t10k-images-idx3-ubyte.gz"), rng.integers(0, 255, (48, 12, 12)))
    write_idx(str(data / "t10k-labels-idx1-ubyte.gz"), rng.integers(0, 7, 48))
    write_idx(str(data / "calib-images-idx3-ubyte.gz"), rng.integers(0, 255, (16, 12, 12)))
    write_idx(str(data / "calib-labels-idx1-ubyte.gz"), rng.integers(0, 7, 16))
    src = str(save_model(small_vim(), d / "fp"))
    q = str(d / "q")
    assert main(["quantize", src, "-o", q, "--calib", str(data)]) == 0
    assert main(["export", q, "-o", str(d / "vim.onnx")]) == 0
    return {"dir": data, "out": d, "q": q, "onnx": str(d / "vim.onnx")}


def test_vim_verify_and_run(vim, capsys):
    assert main(["verify", vim["onnx"], "--reference", vim["q"], "--data", str(vim["dir"]),
                 "--min-top1-agreement", "0.95", "--max-metric-delta", "0.1"]) == 0
    capsys.readouterr()
    out = vim["out"] / "run.json"
    assert main(["run", vim["onnx"], "--images", str(vim["dir"]), "--show", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert len(res["predictions"]) == 48 and "top1" in res and "45 more" in printed
    # a single PNG and a .npy array go through the same preprocessing
    from PIL import Image

    from mq_deploy.data.images import read_idx

    imgs = read_idx(str(vim["dir"] / "t10k-images-idx3-ubyte.gz"))
    Image.fromarray(imgs[0]).save(vim["dir"] / "one.png")
    np.save(vim["dir"] / "some.npy", imgs[:5])
    assert main(["run", vim["onnx"], "--images", str(vim["dir"] / "one.png"), "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["predictions"] == res["predictions"][:1]
    assert main(["run", vim["onnx"], "--images", str(vim["dir"] / "some.npy"), "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["predictions"] == res["predictions"][:5]


def test_run_bad_input(vim, lm, tmp_path, capsys):
    assert_user_error(capsys, ["run", lm["onnx"], "--images", str(vim["dir"])], "Vision Mamba")
    assert_user_error(capsys, ["run", vim["onnx"], "--images", str(tmp_path)], "no images")
    np.save(tmp_path / "big.npy", np.zeros((2, 20, 20), np.uint8))
    assert_user_error(capsys, ["run", vim["onnx"], "--images", str(tmp_path / "big.npy")], "[1, 20, 20]")


def test_build_onnxruntime_backend(lm, capsys):
    out = lm["dir"] / "m.ort.onnx"
    rep_path = lm["dir"] / "build.json"
    assert main(["build", lm["onnx"], "--int8", "--backend", "onnxruntime", "--optShapes", "input_ids:3x40",
                 "--json", str(rep_path)]) == 0
    rep = json.loads(rep_path.read_text())
    assert rep["output"] == str(out) and out.is_file() and rep["verify"]["passed"]
    assert rep["verify"]["feeds"] == {"input_ids": [3, 40]}
    # QDQ around the matmuls became ORT's integer matmuls
    assert rep["op_counts"].get("com.microsoft::MatMulIntegerToFloat", 0) + rep["op_counts"].get("QLinearMatMul", 0)
    assert "optimized model" in capsys.readouterr().out
    assert_user_error(capsys, ["build", lm["onnx"], "--backend", "onnxruntime"], "already exists")
    # the optimized model verifies against the PyTorch reference like the export itself
    assert main(["verify", str(out), "--reference", lm["q"], "--data", lm["text"], "--seq-len", "64", "--limit",
                 "4"]) == 0


def test_build_tensorrt_without_tensorrt_explains(lm, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert_user_error(capsys, ["build", lm["onnx"], "--int8"], "TensorRT", "pip install tensorrt",
                      "--backend onnxruntime")
    assert not os.path.exists(lm["onnx"][:-5] + ".engine")


def test_build_int8_needs_a_quantized_graph(lm, capsys):
    fp_onnx = str(lm["dir"] / "fp_b.onnx")
    assert main(["export", lm["fp"], "-o", fp_onnx]) == 0
    assert_user_error(capsys, ["build", fp_onnx, "--int8", "--backend", "onnxruntime"], "no QuantizeLinear",
                      "mq-deploy quantize")
    assert_user_error(capsys, ["build", fp_onnx, "--backend", "onnxruntime", "--optShapes", "input_ids:2"],
                      "does not fit the input input_ids")


def test_polygraphy_runs_the_export(lm):
    """NVIDIA's polygraphy (the tool TensorRT users debug with) runs the exported file in ORT as it is."""
    import shutil
    import subprocess

    exe = shutil.which("polygraphy")
    if exe is None:
        pytest.skip("polygraphy is not installed (pip install polygraphy)")
    r = subprocess.run([exe, "run", lm["onnx"], "--onnxrt", "--input-shapes", "input_ids:[2,32]"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "PASSED" in r.stdout + r.stderr, r.stdout + r.stderr


def test_large_models_keep_weights_in_a_side_file(lm, tmp_path, monkeypatch):
    """Past protobuf's 2 GiB the initializers go to MODEL.onnx.data (forced here with a zero threshold)."""
    import mq_deploy.export.exporter as ex
    from mq_deploy.backends.ort.runner import OrtRunner

    monkeypatch.setattr(ex, "_EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "big.onnx"
    ex.export(lm["q"], str(out))
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    ids = np.frombuffer(TEXT[:40], np.uint8).astype(np.int64)[None]
    got = OrtRunner(str(out)).infer({"input_ids": ids})["logits"]
    want = OrtRunner(lm["onnx"]).infer({"input_ids": ids})["logits"]
    np.testing.assert_array_equal(got, want)


def test_verify_engine_without_tensorrt(lm, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"\0" * 64)
    assert_user_error(capsys, ["verify", str(eng), "--reference", lm["q"]], "TensorRT")


def test_verify_token_ids_for_non_byte_vocabularies(tmp_path, capsys):
    """An LM with its own tokenizer is verified on token ids (.npy); text is refused with the remedy."""
    src = str(save_model(small_lm(vocab=300, d_model=24, d_model2=24), tmp_path / "lm300"))
    out = str(tmp_path / "m.onnx")
    assert main(["export", src, "-o", out]) == 0
    ids = np.random.default_rng(0).integers(0, 300, (6, 33))
    np.save(tmp_path / "ids.npy", ids)
    j = tmp_path / "v.json"
    assert main(["verify", out, "--reference", src, "--data", str(tmp_path / "ids.npy"), "--json", str(j)]) == 0
    rep = json.loads(j.read_text())
    assert rep["metrics"]["metric"] == "bits_per_token" and rep["metrics"]["samples"] == 6 * 32
    text = tmp_path / "t.txt"
    text.write_bytes(TEXT)
    assert_user_error(capsys, ["verify", out, "--reference", src, "--data", str(text)], "pass --tokenizer")
    np.save(tmp_path / "bad.npy", ids + 300)
    assert_user_error(capsys, ["verify", out, "--reference", src, "--data", str(tmp_path / "bad.npy")], "[0, 300)")
