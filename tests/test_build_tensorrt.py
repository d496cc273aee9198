"""The TensorRT backend without TensorRT: shape specs and the optimization profile (checked before
TensorRT is touched), function-body stripping (export.surgery), the missing-TensorRT errors, and
build_engine's option mapping onto Polygraphy's loaders, against stand-in loaders that record what
Polygraphy would be asked. Tests that need TensorRT itself skip when it is not importable; the
plugin's compile check runs when TENSORRT_INCLUDE_DIR names TensorRT's headers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from mq_deploy.backends.trt import build as mtrt  # noqa: E402
from mq_deploy.backends.trt import plugins as mplugins  # noqa: E402
from mq_deploy.backends.trt.runner import TensorRTRunner  # noqa: E402
from mq_deploy.errors import MQUserError  # noqa: E402
from mq_deploy.export import surgery  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---- parse_shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, want", [
    ("input_ids:1x1", {"input_ids": (1, 1)}),
    ("input_ids:8x256,ssm_state:4x8x64x16", {"input_ids": (8, 256), "ssm_state": (4, 8, 64, 16)}),
    (" pixels : 1x1x28x28 ", {"pixels": (1, 1, 28, 28)}),
    ("'input ids':2X3", {"input ids": (2, 3)}),
    ("ns:name:5", {"ns:name": (5,)}),
    ("", {}),
    (None, {}),
])
def test_parse_shapes_good(spec, want):
    assert mtrt.parse_shapes(spec) == want


@pytest.mark.parametrize("spec, needle", [
    ("input_ids", "name:AxBxC"),
    (":1x2", "name:AxBxC"),
    ("input_ids:", "bad dimensions"),
    ("input_ids:1x", "bad dimensions"),
    ("input_ids:1x-2", "bad dimensions"),
    ("input_ids:1x2.5", "bad dimensions"),
    ("input_ids:1x1,input_ids:8x256", "appears twice"),
    ("images:0x1x28x28", "must be >= 1"),
    ("images:99999999999x1x28x28", "int32 limit"),
])
def test_parse_shapes_bad(spec, needle):
    with pytest.raises(MQUserError, match=needle):
        mtrt.parse_shapes(spec)


def test_profile_shapes_defaults_and_checks():
    inputs = [("input_ids", (-1, "seq")), ("bias", (4,))]
    prof = mtrt.profile_shapes(inputs, "input_ids:1x1", "input_ids:4x64", "input_ids:8x256")
    assert prof == {"input_ids": ((1, 1), (4, 64), (8, 256))}
    # trtexec: only max given -> min = opt = max
    assert mtrt.profile_shapes(inputs, None, None, {"input_ids": [2, 3]}) == {"input_ids": ((2, 3),) * 3}
    with pytest.raises(MQUserError, match="dynamic shape"):
        mtrt.profile_shapes(inputs, None, None, None)
    with pytest.raises(MQUserError, match="min <= opt <= max"):
        mtrt.profile_shapes(inputs, "input_ids:8x8", None, "input_ids:1x1")
    with pytest.raises(MQUserError, match="min <= opt <= max"):     # opt larger than max
        mtrt.profile_shapes(inputs, None, "input_ids:8x512", "input_ids:8x256")
    with pytest.raises(MQUserError, match="rank"):
        mtrt.profile_shapes(inputs, None, None, "input_ids:8")
    with pytest.raises(MQUserError, match="--maxShapes names nope, which is not an input"):
        mtrt.profile_shapes(inputs, None, None, "input_ids:1x1,nope:1")
    with pytest.raises(MQUserError, match="--optShapes names"):
        mtrt.profile_shapes(inputs, None, "imgs:1x1", "input_ids:1x1")
    with pytest.raises(MQUserError, match="fixed to 4"):
        mtrt.profile_shapes(inputs, None, None, "input_ids:1x1,bias:5")


# ---- models ---------------------------------------------------------------------------------------

def _scan_model(path: Path, *, with_hadamard: bool = False) -> Path:
    """x (int8 via QuantizeLinear) -> mq::SelectiveScan (function body: a stand-in Identity chain)."""
    b, D, N = 1, 8, 4
    f32 = lambda *s: np.random.default_rng(0).standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [
        helper.make_tensor("sx", TensorProto.FLOAT, [], [0.05]),
        onnx.numpy_helper.from_array(-np.exp(f32(D, N)), "A"),
        onnx.numpy_helper.from_array(f32(D), "Dskip"),
        onnx.numpy_helper.from_array(f32(D), "dbias"),
        onnx.numpy_helper.from_array(np.ones(D, np.float32), "gscale"),
        onnx.numpy_helper.from_array(np.zeros((b, D, N), np.float32), "h0"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx"], ["xq"]),
        helper.make_node("QuantizeLinear", ["dt", "sx"], ["dq"]),
        helper.make_node("QuantizeLinear", ["Bm", "sx"], ["bq"]),
        helper.make_node("QuantizeLinear", ["Cm", "sx"], ["cq"]),
        helper.make_node("QuantizeLinear", ["z", "sx"], ["zq"]),
        helper.make_node("SelectiveScan", ["xq", "dq", "A", "bq", "cq", "Dskip", "zq", "dbias", "gscale", "h0"],
                         ["y", "h_last"], domain="mq", x_scale=0.05, delta_scale=0.05, B_scale=0.05,
                         C_scale=0.05, z_scale=0.05, out_dtype=1),
    ]
    body = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["h0"], ["h_last"])]
    fn = helper.make_function("mq", "SelectiveScan", ["x", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                                       "gate_scale", "h0"], ["y", "h_last"], body,
                              [helper.make_opsetid("", 21)],
                              attributes=["x_scale", "delta_scale", "B_scale", "C_scale", "z_scale", "out_dtype"])
    functions = [fn]
    outputs = ["y", "h_last"]
    if with_hadamard:
        nodes.append(helper.make_node("Hadamard", ["y"], ["y_rot"], domain="mq"))
        functions.append(helper.make_function("mq", "Hadamard", ["t"], ["u"], [helper.make_node("Identity", ["t"], ["u"])],
                                              [helper.make_opsetid("", 21)]))
        outputs = ["y_rot", "h_last"]
    vi = lambda n, t, s: helper.make_tensor_value_info(n, t, s)  # noqa: E731
    graph = helper.make_graph(
        nodes, "scan", [vi(n, TensorProto.FLOAT, ["b", "L", D]) for n in ("x", "dt", "z")]
        + [vi(n, TensorProto.FLOAT, ["b", "L", N]) for n in ("Bm", "Cm")],
        [vi(outputs[0], TensorProto.FLOAT, ["b", "L", D]), vi("h_last", TensorProto.FLOAT, [b, D, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("mq", 1)],
                              functions=functions)
    model.ir_version = 10
    onnx.save(model, path)
    return path


def _plain_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_strip_function_bodies(tmp_path):
    path = _scan_model(tmp_path / "m.onnx", with_hadamard=True)
    before = path.read_bytes()
    model = onnx.load(path)
    stripped, removed = surgery.strip_function_bodies(model)
    assert removed == ["SelectiveScan"]
    assert [(f.domain, f.name) for f in stripped.functions] == [("mq", "Hadamard")]  # no plugin: keeps its body
    scan = next(n for n in stripped.graph.node if n.op_type == "SelectiveScan")
    attrs = {a.name: helper.get_attribute_value(a) for a in scan.attribute}
    assert attrs["plugin_namespace"] == b"mq" and attrs["plugin_version"] == b"1"
    assert attrs["x_scale"] == pytest.approx(0.05) and attrs["out_dtype"] == 1
    # the input model and the file are untouched
    assert len(model.functions) == 2
    assert not any(a.name == "plugin_namespace" for n in model.graph.node for a in n.attribute)
    assert path.read_bytes() == before
    assert surgery.count_plugin_nodes(model) == 1

    everything, removed_all = surgery.strip_function_bodies(model, op_types=None)
    assert sorted(removed_all) == ["Hadamard", "SelectiveScan"] and len(everything.functions) == 0


# ---- without TensorRT ---------------------------------------------------------------------------

def test_build_engine_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    path = _scan_model(tmp_path / "m.onnx")
    lib = tmp_path / "libmq_scan_trt.so"
    lib.write_bytes(b"")
    with pytest.raises(MQUserError) as ei:
        mtrt.build_engine(path, tmp_path / "m.engine", plugins=[lib], max_shapes=_SCAN_MAX)
    msg = str(ei.value)
    assert "pip install tensorrt" in msg and "JetPack" in msg and "TensorRT_ROOT" in msg
    assert not (tmp_path / "m.engine").exists()


def test_placeholder_tensorrt_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what the PyPI placeholder gives
    with pytest.raises(MQUserError, match="placeholder"):
        mtrt.build_engine(_plain_model(tmp_path / "p.onnx"), tmp_path / "p.engine", max_shapes="x:4x8")


def test_runner_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "e.engine").write_bytes(b"x")
    with pytest.raises(MQUserError, match="pip install tensorrt"):
        TensorRTRunner(tmp_path / "e.engine")


def test_importing_backends_is_lean():
    code = ("import sys, mq_deploy.backends.trt.build, mq_deploy.backends.trt.runner, mq_deploy.backends.base; "
            "bad = [m for m in ('tensorrt', 'torch', 'onnx', 'onnxruntime', 'cuda') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---- build_engine's option mapping onto Polygraphy (stand-in loaders) -----------------------------

_SCAN_MAX = "x:1x64x8,dt:1x64x8,z:1x64x8,Bm:1x64x4,Cm:1x64x4"


def _fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99-fake"
    trt.Builder = object
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    trt.get_plugin_registry = lambda: types.SimpleNamespace(get_creator=lambda *a: "creator")
    return trt


@pytest.fixture
def fake_polygraphy(monkeypatch):
    """Stand-ins for the Polygraphy loaders build_engine calls; they record what they are given and
    build nothing. Real TensorRT behaviour is covered by test_real_tensorrt_* below."""
    import polygraphy.backend.trt as ptrt

    rec: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.delenv(mplugins.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(mplugins, "_PLUGIN_CANDIDATES", ())
    monkeypatch.setattr(mplugins, "register_creators", lambda paths: rec.setdefault("registered", list(paths)))

    class LoadPlugins:
        def __init__(self, plugins=None, obj=None):
            rec["loaded"] = list(plugins)

        def __call__(self):
            return None

    class NetworkFromOnnxPath:
        def __init__(self, path, strongly_typed=None, **kw):
            m = onnx.load(path)      # the stripped copy must exist while the parser reads it
            rec["parsed_functions"] = [f.name for f in m.functions]
            rec["parsed_nodes"] = [(n.domain, n.op_type, {a.name for a in n.attribute}) for n in m.graph.node]
            rec["strongly_typed"], rec["parser_path"] = strongly_typed, path

        def __call__(self):
            return "builder", "network", "parser"

    class _Config:
        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"new-cache")

    class CreateConfig:
        def __init__(self, **kw):
            rec["config"] = kw

        def __call__(self, builder, network):
            return _Config()

    class EngineBytesFromNetwork:
        def __init__(self, network, config=None):
            rec["network"] = network

        def __call__(self):
            return b"ENGINE"

    class _Inspector:
        def get_engine_information(self, fmt):
            return json.dumps({"Layers": [{"Name": "scan", "LayerType": "PluginV3",
                                           "Outputs": [{"Format/Datatype": "Row major linear FP32"}]}]})

    class EngineFromBytes:
        def __init__(self, data):
            pass

        def __call__(self):
            return types.SimpleNamespace(create_engine_inspector=_Inspector)

    for name, obj in (("LoadPlugins", LoadPlugins), ("NetworkFromOnnxPath", NetworkFromOnnxPath),
                      ("CreateConfig", CreateConfig), ("EngineBytesFromNetwork", EngineBytesFromNetwork),
                      ("EngineFromBytes", EngineFromBytes)):
        monkeypatch.setattr(ptrt, name, obj)
    return rec


def test_build_engine_maps_options_onto_polygraphy(tmp_path, fake_polygraphy):
    rec = fake_polygraphy
    model = _scan_model(tmp_path / "m.onnx")
    before = model.read_bytes()
    lib = tmp_path / "libmq_scan_trt.so"
    lib.write_bytes(b"")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    (tmp_path / "out").mkdir()
    rep = mtrt.build_engine(model, tmp_path / "out" / "m.engine", plugins=[lib],
                            min_shapes="x:1x1x8,dt:1x1x8,z:1x1x8,Bm:1x1x4,Cm:1x1x4",
                            max_shapes={"x": (1, 64, 8), "dt": (1, 64, 8), "z": (1, 64, 8), "Bm": (1, 64, 4),
                                        "Cm": (1, 64, 4)},
                            timing_cache=str(cache), workspace=1 << 20)
    assert (tmp_path / "out" / "m.engine").read_bytes() == b"ENGINE"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers                                            # the parser copy is gone
    assert model.read_bytes() == before
    assert rec["parsed_functions"] == []                                         # the parser saw no body
    scan = next(n for n in rec["parsed_nodes"] if n[1] == "SelectiveScan")
    assert {"plugin_namespace", "plugin_version", "x_scale", "out_dtype"} <= scan[2]
    assert rec["loaded"] == rec["registered"] == [str(lib.resolve())]
    assert rec["strongly_typed"] is True
    cfg = rec["config"]
    assert cfg["int8"] is None and cfg["fp16"] is None                          # strongly typed: no flags
    assert cfg["memory_pool_limits"] == {"WORKSPACE": 1 << 20} and cfg["load_timing_cache"] == str(cache)
    prof = cfg["profiles"][0]
    assert tuple(prof["x"].min) == (1, 1, 8) and tuple(prof["x"].opt) == (1, 64, 8) and tuple(prof["x"].max) == (1, 64, 8)
    assert cache.read_bytes() == b"new-cache"
    assert rep["engine_bytes"] == 6 and rep["scan_nodes"] == 1 and rep["stripped_functions"] == ["SelectiveScan"]
    assert rep["layers"] == [{"name": "scan", "type": "PluginV3", "precision": "float32"}]
    assert rep["strongly_typed"] is True and rep["precision_flags"] == []
    # the engine is ours now: a second build needs --overwrite, and with it replaces the engine
    with pytest.raises(MQUserError, match="already exists"):
        mtrt.build_engine(model, tmp_path / "out" / "m.engine", plugins=[lib], max_shapes=_SCAN_MAX)
    mtrt.build_engine(model, tmp_path / "out" / "m.engine", plugins=[lib], max_shapes=_SCAN_MAX, overwrite=True)


def test_build_engine_refuses_before_building(tmp_path, fake_polygraphy):
    model = _scan_model(tmp_path / "m.onnx")
    with pytest.raises(MQUserError, match="mq::SelectiveScan node.*cmake -S plugins/selective_scan"):
        mtrt.build_engine(model, tmp_path / "m.engine", max_shapes=_SCAN_MAX)
    with pytest.raises(MQUserError, match="plugin library not found"):
        mtrt.build_engine(model, tmp_path / "m.engine", plugins=[tmp_path / "nope.so"], max_shapes=_SCAN_MAX)
    user = tmp_path / "user.engine"
    user.write_bytes(b"not ours")
    lib = tmp_path / "libmq_scan_trt.so"
    lib.write_bytes(b"")
    with pytest.raises(MQUserError, match="not written by mq-deploy"):
        mtrt.build_engine(model, user, plugins=[lib], max_shapes=_SCAN_MAX, overwrite=True)
    with pytest.raises(MQUserError, match="input of this command"):
        mtrt.build_engine(model, model, plugins=[lib], max_shapes=_SCAN_MAX, overwrite=True)
    assert user.read_bytes() == b"not ours" and "config" not in fake_polygraphy


def test_build_engine_plain_model_needs_no_plugin(tmp_path, fake_polygraphy):
    rep = mtrt.build_engine(_plain_model(tmp_path / "p.onnx"), tmp_path / "p.engine", opt_shapes="x:4x8")
    assert rep["plugins"] == [] and rep["scan_nodes"] == 0 and "loaded" not in fake_polygraphy
    prof = fake_polygraphy["config"]["profiles"][0]
    assert tuple(prof["x"].min) == tuple(prof["x"].max) == (4, 8)
    with pytest.raises(MQUserError, match="dynamic shape"):
        mtrt.build_engine(_plain_model(tmp_path / "p.onnx"), tmp_path / "p2.engine")


def test_build_engine_fp16_is_weakly_typed(tmp_path, fake_polygraphy):
    lib = tmp_path / "libmq_scan_trt.so"
    lib.write_bytes(b"")
    rep = mtrt.build_engine(_scan_model(tmp_path / "m.onnx"), tmp_path / "m.engine", fp16=True, plugins=[lib],
                            max_shapes="x:1x4x8,dt:1x4x8,z:1x4x8,Bm:1x4x4,Cm:1x4x4")
    assert rep["strongly_typed"] is False and rep["precision_flags"] == ["INT8", "FP16"]
    assert fake_polygraphy["strongly_typed"] is False and rep["scan_nodes_fp16"] == 1
    assert fake_polygraphy["config"]["fp16"] is True and fake_polygraphy["config"]["int8"] is True
    with pytest.raises(MQUserError, match="weakly typed"):
        mtrt.build_engine(_scan_model(tmp_path / "m.onnx"), tmp_path / "m.engine", fp16=True, strongly_typed=True,
                          plugins=[lib])


# ---- real TensorRT and real headers ---------------------------------------------------------------

def test_real_tensorrt_plain_build(tmp_path):
    trt = pytest.importorskip("tensorrt")
    if not hasattr(trt, "Builder"):
        pytest.skip("placeholder tensorrt package")
    rep = mtrt.build_engine(_plain_model(tmp_path / "p.onnx"), tmp_path / "p.engine", max_shapes="x:4x8")
    assert rep["engine_bytes"] > 0 and (tmp_path / "p.engine").stat().st_size == rep["engine_bytes"]
    out = TensorRTRunner(tmp_path / "p.engine").infer({"x": np.array([[-1.0] * 8], np.float32)})
    assert (out["y"] == 0).all()


@pytest.mark.skipif(not os.environ.get("TENSORRT_INCLUDE_DIR"),
                    reason="set TENSORRT_INCLUDE_DIR to TensorRT's include/ to compile the plugin")
@pytest.mark.parametrize("script_name", ["compile_check.sh", "host_check.sh"])
def test_plugin_compile_check(script_name):
    script = REPO / "plugins" / "selective_scan" / "trt" / script_name
    res = subprocess.run(["bash", str(script), os.environ["TENSORRT_INCLUDE_DIR"]], capture_output=True, text=True)
    print(res.stdout[-2000:], res.stderr[-4000:])
    assert res.returncode == 0


def test_cli_build_tensorrt_maps_flags_and_prints_the_report(tmp_path, fake_polygraphy, capsys):
    """`mq-deploy build` -> build_engine: trtexec-style flags, the plugin, the engine path, the report."""
    from mq_deploy.cli.main import main

    model = _scan_model(tmp_path / "m.onnx")
    lib = tmp_path / "libmq_scan_trt.so"
    lib.write_bytes(b"")
    rep = tmp_path / "r.json"
    argv = ["build", str(model), "--int8", "--plugins", str(lib), "--workspace-mib", "2", "--json", str(rep),
            "--minShapes", "x:1x1x8,dt:1x1x8,z:1x1x8,Bm:1x1x4,Cm:1x1x4", "--maxShapes", _SCAN_MAX]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE" and "wrote" in out and "plugin nodes" in out
    assert fake_polygraphy["config"]["memory_pool_limits"] == {"WORKSPACE": 2 << 20}
    assert json.loads(rep.read_text())["scan_nodes"] == 1
    assert main(argv) == 2                     # the engine exists: only replaced with --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_polygraphy_data_loader_drives_polygraphy_run(tmp_path):
    """The workflow of docs/tensorrt.md on the ONNX Runtime side: NVIDIA's `polygraphy run` with our
    data-loader script saves inputs and outputs; a second run compares against them. (The TensorRT
    side, `--model-type engine --trt --load-inputs --load-outputs`, needs TensorRT.)"""
    import shutil

    from helpers import tiny_exports

    if shutil.which("polygraphy") is None:
        pytest.skip("polygraphy CLI not on PATH")
    onnx_path = tiny_exports()["lm"]
    loader = subprocess.run([sys.executable, "-m", "mq_deploy.backends.trt.polygraphy_data_loader"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ, MQ_ONNX=onnx_path, MQ_SHAPES="input_ids:2x24", MQ_ITERATIONS="2")
    first = subprocess.run(["polygraphy", "run", onnx_path, "--onnxrt", "--data-loader-script", loader,
                            "--save-inputs", str(tmp_path / "in.json"), "--save-outputs", str(tmp_path / "out.json")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and "PASSED" in first.stdout, first.stdout[-2000:] + first.stderr[-2000:]
    again = subprocess.run(["polygraphy", "run", onnx_path, "--onnxrt", "--load-inputs", str(tmp_path / "in.json"),
                            "--load-outputs", str(tmp_path / "out.json"), "--atol", "1e-5", "--rtol", "1e-5"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "PASSED" in again.stdout, again.stdout[-2000:]
    from polygraphy.json import load_json

    feeds = load_json(str(tmp_path / "in.json"))
    assert len(feeds) == 2 and feeds[0]["input_ids"].shape == (2, 24) and feeds[0]["input_ids"].max() < 256
