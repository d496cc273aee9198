"""onnx_file.write_model: the model written a tensor at a time parses back to the same model, inline and
with a side file, and the model given to it is left as it was."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mq_deploy.errors import MQUserError  # noqa: E402
from mq_deploy.export.onnx_file import EXTERNAL_MIN_BYTES, initializer_bytes, repoint_external, write_model  # noqa: E402

from helpers import ort_session


def _model():
    """Initializers of every kind the writer must keep: raw float and int8 data of several sizes (one past
    1 MiB, one under the side-file threshold), typed float_data / int64_data fields, and an empty tensor."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((600, 500)).astype(np.float32), "w")       # 1.2 MB
    q = numpy_helper.from_array(rng.integers(-128, 127, (300, 7), dtype=np.int8), "q")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")                # 32 bytes
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.5, -2.0, 0.25])             # float_data
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 500])                     # int64_data
    empty = numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 600])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Reshape", ["xw", "shape"], ["r"]),
             helper.make_node("ReduceSum", ["r"], ["s"], keepdims=1),
             helper.make_node("Add", ["s", "typed"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [w, q, b, typed, shape, empty], doc_string="graph doc")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="test")
    model.ir_version = 10
    model.metadata_props.add(key="k", value="v" * 5000)
    return model


def test_inline_round_trip_leaves_the_model_as_it_was(tmp_path):
    model = _model()
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    assert write_model(model, str(path)) is None
    assert model.SerializeToString() == before
    back = onnx.load(str(path))
    assert back == model
    assert [t.name for t in back.graph.initializer] == ["w", "q", "b", "typed", "shape", "empty"]
    onnx.checker.check_model(str(path), full_check=True)
    # the stream is the whole serialization plus one graph-field header per initializer
    assert os.path.getsize(path) - len(before) < 16 * len(model.graph.initializer)
    assert initializer_bytes(model) == sum(len(t.SerializeToString()) for t in model.graph.initializer)


def test_side_file_round_trip(tmp_path):
    model = _model()
    before = model.SerializeToString()
    path, data = tmp_path / "m.onnx", tmp_path / ".tmp-data"
    shell = write_model(model, str(path), str(data))
    assert model.SerializeToString() == before
    onnx.checker.check_model(str(path), full_check=True)
    entries = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    ext = {n for n, t in entries.items() if t.data_location == TensorProto.EXTERNAL}
    assert ext == {"w", "q"}       # raw data of at least EXTERNAL_MIN_BYTES; the rest stays in the model
    assert len(entries["b"].raw_data) < EXTERNAL_MIN_BYTES
    info = {n: {e.key: e.value for e in entries[n].external_data} for n in ext}
    assert info["w"]["location"] == ".tmp-data" and int(info["w"]["offset"]) % 65536 == 0
    assert int(info["q"]["offset"]) + int(info["q"]["length"]) <= os.path.getsize(data)
    repoint_external(shell, str(path), "m.onnx.data")
    os.rename(data, tmp_path / "m.onnx.data")
    back = onnx.load(str(path))
    for t in back.graph.initializer:     # onnx.load marks the tensors it read back as data_location DEFAULT
        assert t.data_location == TensorProto.DEFAULT
        t.ClearField("data_location")
    assert back == model
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "m.onnx.data").st_mode & 0o777 == 0o666 & ~umask


def test_runs_in_onnxruntime_as_written(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model()
    x = np.random.default_rng(1).standard_normal((2, 600)).astype(np.float32)
    want = ort_session(model).run(None, {"x": x})[0]
    write_model(model, str(tmp_path / "a.onnx"))
    shell = write_model(model, str(tmp_path / "b.onnx"), str(tmp_path / "b.bin"))
    repoint_external(shell, str(tmp_path / "b.onnx"), "b.bin")
    for name in ("a.onnx", "b.onnx"):
        got = ort_session(str(tmp_path / name)).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, want)


def test_never_writes_over_a_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(MQUserError, match="cannot write"):
        write_model(_model(), str(path))
    assert path.read_bytes() == b"precious"
    other = tmp_path / "n.onnx"
    with pytest.raises(MQUserError, match="cannot write"):
        write_model(_model(), str(other), str(path))
    assert path.read_bytes() == b"precious"
