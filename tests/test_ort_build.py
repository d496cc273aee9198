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


@pytest.mark.parametrize("plugins", [pytest.param(True, marks=needs_ort_lib), False], ids=["native", "inlined"])
def test_external_data_input_gives_an_external_data_output(ex, tmp_path, capsys, plugins):
    """A model whose weights lie in an external-data file (a streamed export, as every export past protobuf's
    2 GB) is optimized into OUT + OUT.data: ORT writes the weights beside the model instead of serializing one
    protobuf (the 2.8b build failed there). Both files land under their final names, nothing temporary is left,
    the pair runs from another folder (the model names its side file relatively), and it computes what the
    inline build of the same graph computes."""
    import shutil

    from mq_deploy.export.onnx_file import has_external_data

    src = tmp_path / "lm.onnx"
    assert main(["export", ex["lm_q"], "-o", str(src), "--stream", "on"]) == 0
    assert has_external_data(onnx.load(str(src), load_external_data=False))
    lib = ["--plugins", ORT_LIB] if plugins else []
    out, rep_path = tmp_path / "lm.ort.onnx", tmp_path / "build.json"
    assert main(["build", str(src), "--backend", "onnxruntime", "--int8", *lib, "--saveEngine", str(out),
                 "--json", str(rep_path)]) == 0
    rep = json.loads(rep_path.read_text())
    assert rep["external_data"] == str(out) + ".data" and rep["verify"]["passed"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["build.json", "lm.onnx", "lm.onnx.data", "lm.ort.onnx", "lm.ort.onnx.data"], names
    shell = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in shell.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"lm.ort.onnx.data"}, locations
    moved = tmp_path / "moved"
    moved.mkdir()
    for n in ("lm.ort.onnx", "lm.ort.onnx.data"):
        shutil.move(str(tmp_path / n), str(moved / n))
    inline = tmp_path / "inline.ort.onnx"
    assert main(["build", ex["lm"], "--backend", "onnxruntime", "--int8", *lib, "--saveEngine", str(inline)]) == 0
    assert not (tmp_path / "inline.ort.onnx.data").exists()
    ids = np.random.default_rng(3).integers(0, 256, (2, 24)).astype(np.int64)
    if plugins:
        from mq_deploy.backends.ort.runner import OrtRunner

        got = OrtRunner(str(moved / "lm.ort.onnx"), custom_op_library=ORT_LIB).infer({"input_ids": ids})["logits"]
        want = OrtRunner(str(inline), custom_op_library=ORT_LIB).infer({"input_ids": ids})["logits"]
    else:
        got = _plain_session(str(moved / "lm.ort.onnx")).run(None, {"input_ids": ids})[0]
        want = _plain_session(str(inline)).run(None, {"input_ids": ids})[0]
    err = float(np.abs(got - want).max())
    print(f"external-data build vs inline build of the same graph: max abs {err:.3g}")
    assert err <= 1e-5 * max(1.0, float(np.abs(want).max()))
    # a side file that is not ours is never replaced, with or without --overwrite
    (tmp_path / "user.onnx.data").write_bytes(b"user data")
    assert_user_error(capsys, ["build", str(src), "--backend", "onnxruntime", "--int8", *lib, "--saveEngine",
                               str(tmp_path / "user.onnx"), "--overwrite"], "user.onnx.data")
    assert (tmp_path / "user.onnx.data").read_bytes() == b"user data"
    assert not (tmp_path / "user.onnx").exists()
