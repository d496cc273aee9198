"""The int8 KV cache option (issue 19: "KV cache fp by default, with int8 per-head scales as an option"),
on folders transformers writes: Nemotron-H (plain attention blocks), Falcon-H1 (attention inside a parallel
block) and Zamba2 (per-depth copies of a shared block).

- calibration: each key/value head's scale is its largest |value| on the calibration data / 127;
- PyTorch: the cache is int8, the full sequence equals the decode steps (<= 2e-5 relative, float32 sums in
  another order) and the caches are equal byte for byte;
- ONNX: the step graph's caches are int8 tensors; the graph's logits match the PyTorch reference's (<= 2e-5)
  and its caches hold the reference's bytes but for a rounding tie moved by float32 noise (<= 1 unit, on
  <= 1 % of the entries); full graph and decode steps agree;
- the command line: quantize --kv-cache int8 -> export (full, step) -> verify -> generate, and compare's
  +kv-int8 rows;
- bad input: a model with no attention, a corrupted scale, a float cache fed to an int8 graph: one line each."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mq_deploy.cli.main import main
from mq_deploy.families import state_inputs, zero_states
from mq_deploy.families.attention import kv
from mq_deploy.models.loaders import load_model

from helpers import assert_user_error, ort_session, quantize_export_verify, step_graph_decode
from helpers import max_rel as _rel

transformers = pytest.importorskip("transformers")

from test_falcon_h1 import _falcon  # noqa: E402
from test_hybrids import _nemotron, _text  # noqa: E402
from test_zamba2 import _zamba  # noqa: E402

MAKERS = {"nemotron-h": _nemotron, "falcon-h1": _falcon, "zamba2": _zamba}


def _int8_kv_model(tmp_path, which):
    """A float model whose every attention block stores its cache as int8, scales from 4 random sequences."""
    _, path = MAKERS[which](tmp_path)
    loaded = load_model(path)
    calib = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(5))
    with kv.observe(loaded.model) as amax, torch.no_grad():
        loaded.model(calib)
    n = kv.set_int8(loaded.model, amax)
    assert n == len(kv.attention_modules(loaded.model)) >= 1
    return loaded, amax


@pytest.mark.parametrize("which", list(MAKERS))
def test_int8_cache_decode_steps_equal_the_full_sequence(tmp_path, which):
    loaded, amax = _int8_kv_model(tmp_path, which)
    model = loaded.model
    for name, m in kv.attention_modules(model):        # scale = the head's largest |key| / |value| / 127
        assert torch.equal(m.kv_scale, amax[name].clamp_min(1e-12) / 127)
    caches = [si for si in state_inputs(loaded.config) if not si.spec.stacked]
    assert caches and all(si.spec.dtype == "int8" for si in caches)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, st_full = model(ids, return_state=True)
        _, st = model(ids[:, :7], return_state=True)
        steps = []
        for t in range(7, 19):
            lg, st = model.step(ids[:, t], st)
            steps.append(lg)
    print(which, "step", _rel(torch.stack(steps, 1), full[:, 7:]))
    assert _rel(torch.stack(steps, 1), full[:, 7:]) <= 2e-5
    for si in caches:                               # the same int8 bytes, 19 positions
        a, b = st[si.layers[0]][si.position], st_full[si.layers[0]][si.position]
        assert a.dtype == torch.int8 and a.shape[2] == 19 and torch.equal(a, b)
        assert int(a.abs().max()) >= 100            # the range is used (the calibration saw these sequences' kind)


@pytest.mark.parametrize("which", list(MAKERS))
def test_int8_cache_graphs_match_the_reference(tmp_path, which):
    from mq_deploy.export.graph import build_model

    loaded, _ = _int8_kv_model(tmp_path, which)
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, st = loaded.model(ids, return_state=True)
    got = ort_session(build_model(loaded.model)).run(["logits"], {"input_ids": ids.numpy()})[0]
    print(which, "full", _rel(got, want))
    assert _rel(got, want) <= 2e-5
    sess = ort_session(build_model(loaded.model, step=True))
    caches = [si for si in state_inputs(loaded.config) if not si.spec.stacked]
    assert all(i.type == "tensor(int8)" for i in sess.get_inputs() if i.name in {si.name for si in caches})
    assert all(o.type == "tensor(int8)" for o in sess.get_outputs() if o.name in {si.output for si in caches})
    stepped, last = step_graph_decode(loaded.model, loaded.config, ids.numpy(), prefill=6)
    print(which, "step", _rel(stepped, want))
    assert _rel(stepped, want.numpy()) <= 2e-5
    for si in caches:
        ref = st[si.layers[0]][si.position].numpy()
        out = last[si.output]
        assert out.dtype == np.int8 and out.shape == ref.shape
        diff = np.abs(out.astype(np.int32) - ref)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())


def test_int8_cache_through_the_command_line(tmp_path, capsys):
    _, path = _nemotron(tmp_path, vocab=256)
    text = _text(tmp_path)
    q = quantize_export_verify(tmp_path, capsys, path, text, "--kv-cache", "int8")
    with open(os.path.join(q, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["quant"]["kv_cache"] == "int8"
    assert [layer["kv_cache"] for layer in cfg["layers"] if layer["kind"] == "attention"] == ["int8", "int8"]
    assert main(["generate", str(tmp_path / "step.onnx"), "--prompt", "In the", "--max-new-tokens", "8"]) == 0
    capsys.readouterr()
    # a float cache fed to the int8 graph: one line from the runner
    from mq_deploy.backends.ort.runner import OrtRunner

    runner = OrtRunner(str(tmp_path / "step.onnx"))
    feeds = {"input_ids": np.zeros((1, 3), np.int64), **zero_states(load_model(q).config, 1)}
    runner.infer(feeds)
    name = next(k for k, v in feeds.items() if v.dtype == np.int8)
    feeds[name] = feeds[name].astype(np.float32)
    with pytest.raises(Exception) as e:
        runner.infer(feeds)
    assert type(e.value).__name__ == "MQUserError" and f"input {name} must be int8, got float32" in str(e.value)


def test_compare_reports_the_int8_cache_rows(tmp_path, capsys):
    _, path = _nemotron(tmp_path, vocab=256)
    text = _text(tmp_path)
    out = str(tmp_path / "c.json")
    assert main(["compare", path, "--recipes", "fp,rtn", "--bits", "w8a8", "--kv-cache", "fp32,int8", "--calib",
                 text, "--calib-samples", "4", "--calib-seq-len", "64", "--data", text, "--limit", "4",
                 "--seq-len", "64", "--json", out]) == 0
    with open(out) as f:
        table = json.load(f)
    rows = {(r["recipe"], r["bits"]): r for r in table["rows"]}
    assert rows[("rtn+kv-int8", "w8a8")]["kv_cache"] == "int8" and rows[("rtn", "w8a8")]["kv_cache"] == "fp32"
    assert rows[("rtn+kv-int8", "w8a8")]["value"] != rows[("rtn", "w8a8")]["value"]     # the cache was rounded
    assert any(p["a"] == "rtn+kv-int8" and p["b"] == "rtn" for p in table["pairs"])


def test_bad_int8_cache_inputs_are_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    text = _text(tmp_path)
    m2 = tmp_path / "m2"
    torch.manual_seed(0)
    transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, n_groups=2,
        expand=2, chunk_size=16)).save_pretrained(str(m2))
    assert_user_error(capsys, ["quantize", m2, "-o", tmp_path / "q2", "--kv-cache", "int8", "--calib", text,
                               "--calib-samples", "2", "--seq-len", "64"], "has no attention layer")
    assert not (tmp_path / "q2").exists()
    assert_user_error(capsys, ["compare", m2, "--recipes", "rtn", "--bits", "w8a8", "--kv-cache", "int8", "--calib",
                               text, "--data", text, "--limit", "2"], "has no attention layer")
    assert_user_error(capsys, ["compare", m2, "--kv-cache", "int4", "--data", text], "unknown KV cache storage")
    _, path = _nemotron(tmp_path, vocab=256)
    q = tmp_path / "q"
    assert main(["quantize", path, "-o", str(q), "--kv-cache", "int8", "--calib", text, "--calib-samples", "2",
                 "--seq-len", "64"]) == 0
    weights = load_file(str(q / "model.safetensors"))
    key = next(k for k in weights if k.endswith("kv_scale"))
    weights[key][1, 0] = 0.0
    save_file(weights, str(q / "model.safetensors"), metadata={"format": "pt"})
    assert_user_error(capsys, ["export", q, "-o", tmp_path / "x.onnx"], "kv_scale must be finite and > 0")
    with open(q / "config.json") as f:
        cfg = json.load(f)
    next(layer for layer in cfg["layers"] if layer["kind"] == "attention")["kv_cache"] = "int4"
    with open(q / "config.json", "w") as f:
        json.dump(cfg, f)
    assert_user_error(capsys, ["info", q], "kv_cache must be one of fp32, int8")
