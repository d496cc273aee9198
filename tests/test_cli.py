"""The command line as a user meets it: clear one-line errors for bad input, JSON outputs, lean imports."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mq_deploy.cli.main import main
from mq_deploy.models.io import save_model

from helpers import assert_user_error, run_cli, small_lm, small_vim


@pytest.fixture
def lm_dir(tmp_path):
    return str(save_model(small_lm(vocab=256), tmp_path / "lm"))


def test_import_is_lean():
    code = "import sys, mq_deploy, mq_deploy.cli.main; print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt', 'safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_runs():
    r = run_cli("--help")
    assert r.returncode == 0 and "eval" in r.stdout and "info" in r.stdout


def test_missing_path(capsys, tmp_path):
    assert_user_error(capsys, ["info", str(tmp_path / "nope")], "no such file or directory")


def test_unknown_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_user_error(capsys, ["info", str(tmp_path)], "unsupported model_type 'llama'")
    (tmp_path / "config.json").write_text(json.dumps({"mq_deploy_format": 1, "architecture": "rwkv"}))
    assert_user_error(capsys, ["info", str(tmp_path)], "unknown architecture 'rwkv'")


def test_bad_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_user_error(capsys, ["info", str(tmp_path)], "config.json", "not valid JSON")


def test_truncated_safetensors(capsys, lm_dir):
    p = os.path.join(lm_dir, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    assert_user_error(capsys, ["info", lm_dir], "model.safetensors", "corrupt or truncated")


def test_garbage_safetensors(capsys, lm_dir):
    open(os.path.join(lm_dir, "model.safetensors"), "wb").write(b"\x00" * 64)
    assert_user_error(capsys, ["eval", lm_dir, "--data", __file__], "corrupt or truncated")


def test_shape_mismatch(capsys, lm_dir):
    cfg_path = os.path.join(lm_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["mixer"]["d_state"] = 8
    json.dump(cfg, open(cfg_path, "w"))
    assert_user_error(capsys, ["info", lm_dir], "A_log", "shape")


def test_missing_tensor(capsys, lm_dir):
    from safetensors.torch import load_file, save_file

    p = os.path.join(lm_dir, "model.safetensors")
    sd = load_file(p)
    del sd["layers.1.mixer.D"]
    save_file(sd, p)
    assert_user_error(capsys, ["info", lm_dir], "missing 1 tensors", "layers.1.mixer.D")


def test_nan_weights(capsys, lm_dir):
    from safetensors.torch import load_file, save_file

    p = os.path.join(lm_dir, "model.safetensors")
    sd = load_file(p)
    sd["norm_f.weight"][3] = float("nan")
    save_file(sd, p)
    assert_user_error(capsys, ["info", lm_dir], "norm_f.weight", "NaN")


def test_invalid_config_value(capsys, lm_dir):
    cfg_path = os.path.join(lm_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["n_layer"] = 0
    json.dump(cfg, open(cfg_path, "w"))
    assert_user_error(capsys, ["info", lm_dir], "n_layer must be in [1, 1024], got 0")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(capsys, tmp_path):
    p = tmp_path / "vim.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, p)
    assert_user_error(capsys, ["info", str(p)], "refused to unpickle")


def test_truncated_pth(capsys, tmp_path):
    p = tmp_path / "vim.pth"
    torch.save({"model": small_vim().state_dict()}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    assert_user_error(capsys, ["info", str(p)], "corrupt or truncated")


def test_eval_lm_json(tmp_path, lm_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(32, 127)) * 40)
    out = tmp_path / "r.json"
    assert main(["eval", lm_dir, "--data", str(text), "--seq-len", "64", "--limit", "5", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r) == {"mq_deploy_version", "metric", "value", "samples", "perplexity", "bytes"}
    assert r["metric"] == "bits_per_byte" and r["samples"] == 5 * 64 and 0 < r["value"] < 16
    # a byte LM: one token per byte, so the perplexity per token is 2 ** bits per byte
    assert r["bytes"] == 5 * 64 and abs(math.log2(r["perplexity"]) - r["value"]) < 1e-9
    assert "bits_per_byte" in capsys.readouterr().out


def test_eval_needs_data_for_foreign_models(capsys, lm_dir):
    assert_user_error(capsys, ["eval", lm_dir], "pass --data")


def test_eval_rejects_non_byte_vocab(capsys, tmp_path):
    d = str(save_model(small_lm(vocab=50), tmp_path / "lm50"))
    assert_user_error(capsys, ["eval", d, "--data", __file__], "pass --tokenizer")


def test_eval_vim_bad_data_dir(capsys, tmp_path):
    d = str(save_model(small_vim(), tmp_path / "vim"))
    assert_user_error(capsys, ["eval", d, "--data", str(tmp_path)], "t10k-images-idx3-ubyte")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x05" * 3)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01" * 5)
    assert_user_error(capsys, ["eval", d, "--data", str(tmp_path)], "truncated or corrupt")


def test_eval_vim_on_idx(tmp_path):
    import numpy as np

    from mq_deploy.data.images import write_idx

    d = str(save_model(small_vim(), tmp_path / "vim"))
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    write_idx(str(data / "t10k-images-idx3-ubyte.gz"), rng.integers(0, 255, (40, 12, 12)))
    write_idx(str(data / "t10k-labels-idx1-ubyte.gz"), rng.integers(0, 7, 40))
    out = tmp_path / "r.json"   # beside the data folder: outputs never land in an input
    r = run_cli("eval", d, "--data", str(data), "--limit", "30", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["metric"] == "top1" and res["samples"] == 30 and 0 <= res["value"] <= 1


def test_compare_json_rows(tmp_path, lm_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(b"Thou shalt love thy neighbour as thyself. " * 60)
    out = tmp_path / "table.json"
    argv = ["compare", lm_dir, "--recipes", "rtn,quarot", "--bits", "w8a8", "--calib", str(text), "--calib-samples",
            "2", "--data", str(text), "--limit", "2", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["recipe"], r["bits"]) for r in rows] == [("fp", "fp"), ("rtn", "w8a8"), ("quarot", "w8a8")]
    assert all({"recipe", "bits", "metric", "value", "delta"} <= set(r) for r in rows)
    assert rows[0]["delta"] == 0 and rows[1]["value"] != rows[0]["value"]


def test_compare_rejects_unknown_recipe_and_bits(capsys, lm_dir):
    assert_user_error(capsys, ["compare", lm_dir, "--recipes", "gptq"], "unknown recipe", "mambaquant")
    assert_user_error(capsys, ["compare", lm_dir, "--bits", "w3a8"], "unknown bit width")


@pytest.mark.parametrize("recipe", ["rtn", "mambaquant"])
def test_quantize_then_eval_equals_in_memory_fake_quant(tmp_path, lm_dir, recipe):
    from mq_deploy.calib.collect import text_forward_loop
    from mq_deploy.data.text import read_bytes
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.fakequant import QuantConfig
    from mq_deploy.quant.qcheckpoint import load
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

    text = tmp_path / "t.txt"
    text.write_bytes(b"Blessed are the meek: for they shall inherit the earth. " * 80)
    out = tmp_path / "q"
    assert main(["quantize", lm_dir, "--recipe", recipe, "--wbits", "4", "--calib", str(text), "--calib-samples", "3",
                 "-o", str(out)]) == 0
    assert {"config.json", "model.safetensors", "scales.safetensors", "manifest.json"} <= set(os.listdir(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == recipe and manifest["wbits"] == 4 and manifest["calibration"]["samples"] == 3
    ids = torch.randint(0, 256, (2, 40))
    ref = load_model(lm_dir)
    apply_recipe(ref.model, text_forward_loop(read_bytes(str(text)), 512, 3), RecipeConfig(recipe, QuantConfig(4, 8)))
    with torch.no_grad():
        got, want = load(str(out)).model(ids), ref.model(ids)
    assert torch.equal(got, want)
    # the input is never overwritten, and an existing output is only replaced when asked
    assert main(["quantize", lm_dir, "-o", lm_dir, "--calib", str(text)]) == 2
    assert main(["quantize", lm_dir, "-o", str(out), "--calib", str(text)]) == 2


def test_inspect_writes_plots_and_summary(tmp_path, lm_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(b"For God so loved the world, that he gave his only begotten Son. " * 50)
    out = tmp_path / "insp"
    assert main(["inspect", lm_dir, "--calib", str(text), "--calib-samples", "4", "-o", str(out)]) == 0
    files = set(os.listdir(out))
    assert {"summary.md", "summary.json", "layers_0_mixer_out_proj.png", "layers_1_mixer_x.png"} <= files
    assert open(out / "layers_0_mixer_in_proj.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {r["view"] for r in rows} == {"raw", "hadamard", "klt_hadamard", "smooth_rotate"}
    assert all(r["max_median_channel_max"] >= 1 and r["kurtosis"] > 0 for r in rows)
    assert main(["inspect", lm_dir, "--calib", str(text), "-o", str(out)]) == 2   # no silent overwrite


def test_cli_recipe_choices_match_the_library():
    """The parser lists recipes literally (importing them would pull torch into --help)."""
    from mq_deploy.cli.main import build_parser
    from mq_deploy.quant.recipes import RECIPES

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert tuple(next(a for a in sub["quantize"]._actions if a.dest == "recipe").choices) == RECIPES
    assert set(next(a for a in sub["inspect"]._actions if a.dest == "recipe").choices) == set(RECIPES) - {"fp"}
