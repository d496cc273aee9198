"""`mq-deploy build --backend onnxruntime` (issue 20): by default the optimized file runs in a plain ONNX
Runtime session with no custom-op library (the mq:: function bodies are inlined); with --plugins it keeps
native mq:: nodes, says so in one line, and records the library it needs in its metadata and the report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from mq_deploy.cli.main import main

from helpers import assert_user_error, ort_lib_marker, ort_session, tiny_exports

ORT_LIB, needs_ort_lib = ort_lib_marker()


@pytest.fixture(scope="module")
def ex():
    return tiny_exports()


def _plain_session(path):

    return ort_session(path)     # no custom-op library registered


def test_default_output_runs_anywhere(ex, tmp_path, capsys):
    from mq_deploy.backends.ort.runner import OrtRunner

    out, rep_path = tmp_path / "vim.ort.onnx", tmp_path / "build.json"
    assert main(["build", ex["vim"], "--backend", "onnxruntime", "--int8", "--saveEngine", str(out),
                 "--json", str(rep_path)]) == 0
    printed = capsys.readouterr().out
    assert "runs in any ONNX Runtime" in printed, printed
    rep = json.loads(rep_path.read_text())
    assert rep["requires_custom_op_library"] is None and rep["verify"]["passed"]
    model = onnx.load(str(out))
    assert not [n for n in model.graph.node if n.domain == "mq"]
    assert "mq.custom_op_library" not in {p.key for p in model.metadata_props}
    x = np.random.default_rng(0).standard_normal((3, 1, 12, 12)).astype(np.float32)
    got = _plain_session(str(out)).run(None, {"images": x})[0]
    want = OrtRunner(ex["vim"], custom_op_library=False).infer({"images": x})["logits"]
    err = np.abs(got - want).max()
    print(f"plain-session optimized vs function bodies: max abs {err:.3g} (logits magnitude "
          f"{np.abs(want).max():.3g})")
    # ORT's fused integer matmuls round differently from the QDQ reference: same top-1, logits close
    assert err <= 0.05 * np.abs(want).max() and (got.argmax(-1) == want.argmax(-1)).all()


@needs_ort_lib
def test_plugins_output_names_the_library_it_needs(ex, tmp_path, capsys):
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.errors import MQUserError

    out, rep_path = tmp_path / "vim.native.onnx", tmp_path / "build.json"
    assert main(["build", ex["vim"], "--backend", "onnxruntime", "--int8", "--plugins", ORT_LIB,
                 "--saveEngine", str(out), "--json", str(rep_path)]) == 0
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if "libmq_scan_ort.so" in ln]
    assert len(lines) == 1 and "needs the custom-op library" in lines[0], printed
    rep = json.loads(rep_path.read_text())
    assert rep["requires_custom_op_library"] == "libmq_scan_ort.so"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["mq.custom_op_library"] == "libmq_scan_ort.so"
    with pytest.raises(Exception, match="mq:SelectiveScan"):      # as the user would find out otherwise
        _plain_session(str(out))
    with pytest.raises(MQUserError, match="built with the custom-op library libmq_scan_ort.so"):
        OrtRunner(str(out), custom_op_library=False)
    x = np.zeros((2, 1, 12, 12), np.float32)
    assert OrtRunner(str(out), custom_op_library=ORT_LIB).infer({"images": x})["logits"].shape == (2, 7)


def test_a_graph_without_function_bodies_needs_plugins(ex, tmp_path, capsys):
    m = onnx.load(ex["vim"])
    del m.functions[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(m, str(stripped))
    assert_user_error(capsys, ["build", str(stripped), "--backend", "onnxruntime"], "no function body to inline",
                      "--plugins libmq_scan_ort.so")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stripped.onnx"]
