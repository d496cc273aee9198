"""TensorRT engine build and runner for mq-deploy's ONNX (QDQ int8 + mq::SelectiveScan plugin nodes).

How the ONNX parser meets our op. onnx-tensorrt (ModelImporter.cpp, FallbackPluginImporter in
onnxOpImporters.cpp) dispatches each node by op_type alone: a built-in importer first, then a
model-local function of that name (it inlines the body), and only then the plugin registry with
(name = node.op_type, version = attribute `plugin_version` or "1", namespace = attribute
`plugin_namespace` or ""). The node's ONNX domain plays no part. So a TensorRT build
  1. removes the FunctionProto bodies of the ops that have a plugin (mq::SelectiveScan), or the
     parser would inline the float Scan body instead of calling the plugin;
  2. writes plugin_namespace="mq" and plugin_version="1" on those nodes, because the creator in
     libmq_scan_trt.so is registered in namespace "mq" (not "", which would let any other library's
     "SelectiveScan" v1 creator, e.g. a future one in the default namespace, bind our nodes).
The creator lists the fields x_scale, delta_scale, B_scale, C_scale, z_scale (FLOAT -> kFLOAT32) and
out_dtype (INT -> kINT32); the parser passes exactly those node attributes.
Other mq ops keep their bodies: mq::SelectiveScanFloat (the FP32 baseline) and mq::Hadamard have no
plugin, and the parser imports them as local functions.

Precision. Networks are built STRONGLY_TYPED by default (explicit quantization): QuantizeLinear /
DequantizeLinear pairs and the tensor types in the ONNX carry every precision, and TensorRT refuses
the INT8/FP16 builder flags for such networks. `int8=True` therefore only states what the graph
already is; `fp16=True` needs a weakly typed network (`strongly_typed=False`, which `fp16=True`
selects when strongly_typed is left as None): TensorRT may then run the layers outside Q/DQ in fp16
(trtexec --int8 --fp16 on a QDQ model), and the scan nodes are switched to out_dtype=10 (fp16 y).
Weakly typed networks and these flags are deprecated since TensorRT 10.12.

Nothing here imports tensorrt, onnx or a CUDA binding at module import time.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from mq_deploy.errors import MQInternalError, MQUserError

PLUGIN_DOMAIN = "mq"
PLUGIN_OPS = ("SelectiveScan",)          # mq ops implemented by libmq_scan_trt.so
PLUGIN_NAMESPACE = "mq"                  # creator namespace in selective_scan_plugin.h
PLUGIN_VERSION = "1"
PLUGIN_LIBRARY = "libmq_scan_trt.so"
PLUGIN_ENV = "MQ_SCAN_TRT_PLUGIN"        # path of the plugin library, used when plugins= is empty

_REPO_ROOT = Path(__file__).resolve().parents[2]
# Where `cmake -S plugins/selective_scan -B <dir>` leaves the library in the documented builds.
_PLUGIN_CANDIDATES = (
    "build/scan/" + PLUGIN_LIBRARY,
    "plugins/selective_scan/build/" + PLUGIN_LIBRARY,
    "build/" + PLUGIN_LIBRARY,
)

_INSTALL_TENSORRT = (
    "Install TensorRT's Python bindings: on x86-64 `pip install tensorrt` (NVIDIA's wheels, "
    "https://pypi.nvidia.com; the version must match the CUDA driver), on Jetson the JetPack "
    "package `sudo apt install python3-libnvinfer` (TensorRT ships with JetPack). "
    "A TensorRT build also needs a GPU and the mq::SelectiveScan plugin library, built with "
    "`cmake -S plugins/selective_scan -B build/scan -DTensorRT_ROOT=<TensorRT dir> && "
    "cmake --build build/scan -j` (JetPack: -DTensorRT_ROOT=/usr). To deploy without TensorRT, "
    "build for ONNX Runtime instead: `mq-deploy build MODEL.onnx --int8 --backend onnxruntime`."
)
_BUILD_PLUGIN = (
    "build it with `cmake -S plugins/selective_scan -B build/scan -DTensorRT_ROOT=<TensorRT dir> "
    "&& cmake --build build/scan -j` (on Jetson -DTensorRT_ROOT=/usr), then pass its path "
    f"(plugins=[...], or `--plugins`), or set {PLUGIN_ENV}"
)


# ---- small pure-Python parts (tested without TensorRT) ---------------------------------------------

_DIMS_RE = re.compile(r"^\d+(x\d+)*$")


def parse_shapes(spec: str | None) -> dict[str, tuple[int, ...]]:
    """trtexec-style shapes, `name:AxBxC[,name:DxE...]` -> {name: (A, B, C), ...}.

    Names may contain ':' (the dims follow the last one) and may be quoted ('input ids':1x8).
    An empty or None spec gives {}.
    """
    if spec is None or not spec.strip():
        return {}
    if not isinstance(spec, str):
        raise MQUserError(f"shape spec must be a string like 'input_ids:1x256', got {type(spec).__name__}")
    out: dict[str, tuple[int, ...]] = {}
    for item in spec.split(","):
        item = item.strip()
        name, sep, dims = item.rpartition(":")
        name = name.strip().strip("'\"")
        dims = dims.strip().lower()
        if not sep or not name:
            raise MQUserError(f"bad shape {item!r} in {spec!r}: expected name:AxBxC, e.g. input_ids:1x256")
        if not _DIMS_RE.match(dims):
            raise MQUserError(f"bad dimensions {dims!r} for {name!r} in {spec!r}: expected non-negative "
                              "integers joined by 'x', e.g. 8x256")
        if name in out:
            raise MQUserError(f"input {name!r} appears twice in {spec!r}; give each input once per shape spec "
                              "(min, opt and max shapes are separate specs)")
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def _as_shapes(value, what: str) -> dict[str, tuple[int, ...]]:
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_shapes(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            try:
                dims = tuple(int(d) for d in v)
            except (TypeError, ValueError):
                raise MQUserError(f"{what}[{k!r}] must be a sequence of ints, got {v!r}") from None
            if any(d < 0 for d in dims):
                raise MQUserError(f"{what}[{k!r}] has a negative dimension: {dims}")
            out[str(k)] = dims
        return out
    raise MQUserError(f"{what} must be a 'name:AxB,...' string or a dict name -> shape, got {type(value).__name__}")


def _iter_nodes(graph):
    """Every node of a graph, including those of subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_nodes(attr.g)
            for g in attr.graphs:
                yield from _iter_nodes(g)


def _all_nodes(model):
    yield from _iter_nodes(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield node


def count_plugin_nodes(model, *, domain: str = PLUGIN_DOMAIN, op_types: Iterable[str] = PLUGIN_OPS) -> int:
    ops = set(op_types)
    return sum(1 for n in _all_nodes(model) if n.domain == domain and n.op_type in ops)


def strip_function_bodies(model, *, domain: str = PLUGIN_DOMAIN, op_types: Iterable[str] | None = PLUGIN_OPS,
                          plugin_namespace: str | None = PLUGIN_NAMESPACE,
                          plugin_version: str | None = PLUGIN_VERSION):
    """A copy of `model` for TensorRT's ONNX parser: the FunctionProtos of `domain` whose names are in
    `op_types` (all of the domain when None) removed, and plugin_namespace / plugin_version written on
    their nodes (existing values are kept). Returns (model copy, names of the removed functions).
    The input model is not modified."""
    import onnx
    from onnx import helper

    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    keep, removed = [], []
    for fn in stripped.functions:
        if fn.domain == domain and (op_types is None or fn.name in set(op_types)):
            removed.append(fn.name)
        else:
            keep.append(fn)
    del stripped.functions[:]
    stripped.functions.extend(keep)
    removed_set = set(removed)
    for node in _all_nodes(stripped):
        if node.domain != domain or node.op_type not in removed_set:
            continue
        have = {a.name for a in node.attribute}
        if plugin_namespace is not None and "plugin_namespace" not in have:
            node.attribute.append(helper.make_attribute("plugin_namespace", plugin_namespace))
        if plugin_version is not None and "plugin_version" not in have:
            node.attribute.append(helper.make_attribute("plugin_version", plugin_version))
    return stripped, removed


def _set_scan_out_dtype(model, out_dtype: int) -> int:
    """Set out_dtype on every plugin scan node and drop the value_info of their y outputs (which
    declared the old type); returns how many nodes were changed."""
    from onnx import helper

    n, ys = 0, set()
    for node in _all_nodes(model):
        if node.domain != PLUGIN_DOMAIN or node.op_type not in PLUGIN_OPS:
            continue
        for attr in list(node.attribute):
            if attr.name == "out_dtype":
                node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute("out_dtype", int(out_dtype)))
        if node.output:
            ys.add(node.output[0])
        n += 1
    keep = [vi for vi in model.graph.value_info if vi.name not in ys]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return n


class _parser_copy:
    """The stripped model as a temporary file for parse_from_file: next to the original, so relative
    external-data locations resolve; in a temp folder when that directory is read-only (then only a
    model without external data can go)."""

    def __init__(self, model, onnx_path: Path):
        self.model, self.onnx_path, self.path, self.tmpdir = model, onnx_path, None, None

    def __enter__(self) -> str:
        import onnx

        try:
            fd, self.path = tempfile.mkstemp(prefix="." + self.onnx_path.stem + ".trt-", suffix=".onnx",
                                             dir=self.onnx_path.parent)
            os.close(fd)
        except OSError:
            if any(t.data_location == onnx.TensorProto.EXTERNAL for t in self.model.graph.initializer):
                raise MQUserError(f"{self.onnx_path.parent} is not writable and {self.onnx_path.name} keeps its "
                                  "weights in external data files; the TensorRT build writes a stripped copy "
                                  "next to it. Copy the model folder somewhere writable.") from None
            self.tmpdir = tempfile.mkdtemp(prefix="mq-trt-")
            self.path = os.path.join(self.tmpdir, self.onnx_path.name)
        onnx.save(self.model, self.path)
        return self.path

    def __exit__(self, *exc):
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)
        if self.tmpdir:
            os.rmdir(self.tmpdir)
        return False


def find_plugin_library(plugins: Sequence[str | os.PathLike] | None = ()) -> list[str]:
    """Plugin libraries to load: the given paths (each must exist), else $MQ_SCAN_TRT_PLUGIN, else the
    first of the documented CMake build locations that exists; [] when none is found."""
    paths = [Path(p) for p in (plugins or ())]
    if paths:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MQUserError(f"plugin library not found: {', '.join(missing)}; {_BUILD_PLUGIN}")
        return [str(p.resolve()) for p in paths]
    env = os.environ.get(PLUGIN_ENV)
    if env:
        if not Path(env).is_file():
            raise MQUserError(f"{PLUGIN_ENV}={env} does not name a file; {_BUILD_PLUGIN}")
        return [str(Path(env).resolve())]
    for rel in _PLUGIN_CANDIDATES:
        cand = _REPO_ROOT / rel
        if cand.is_file():
            return [str(cand)]
    return []


def _write_atomic(path: Path, data) -> None:
    """Write bytes next to `path` and rename over it, so a reader never sees half an engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- TensorRT (lazy) ----------------------------------------------------------------------------

def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MQUserError(f"TensorRT is not available in this Python ({e}). {_INSTALL_TENSORRT}") from None
    if not hasattr(trt, "Builder"):
        # The PyPI name without NVIDIA's index can resolve to a placeholder package.
        raise MQUserError(f"the installed 'tensorrt' module ({getattr(trt, '__file__', '?')}) has no Builder: "
                          f"it is a placeholder, not TensorRT. {_INSTALL_TENSORRT}")
    return trt


_LOADED_PLUGINS: dict[str, object] = {}   # path -> handle; a library is loaded once per process


def load_plugins(trt, paths: Sequence[str]) -> list[str]:
    """Load plugin libraries into TensorRT's process-wide registry. TensorRT >= 10 calls the
    library's getCreators() (IPluginRegistry::loadLibrary); older bindings fall back to dlopen plus
    mq_scan_trt_register_creators()."""
    registry = trt.get_plugin_registry()
    for path in paths:
        if path in _LOADED_PLUGINS:
            continue
        handle = None
        if hasattr(registry, "load_library"):
            handle = registry.load_library(path)
        if handle is None:
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise MQUserError(f"cannot load plugin library {path}: {e}. Its dependencies (libnvinfer, "
                                  "libmq_scan_cuda.so, libcudart) must be on the loader path") from None
            register = getattr(lib, "mq_scan_trt_register_creators", None)
            if register is not None:
                register.restype = ctypes.c_int32
                if register() != 0:
                    raise MQUserError(f"{path}: mq_scan_trt_register_creators() failed; see the log above")
            handle = lib
        _LOADED_PLUGINS[path] = handle
    return list(paths)


def _scan_creator(trt):
    registry = trt.get_plugin_registry()
    if hasattr(registry, "get_creator"):
        return registry.get_creator(PLUGIN_OPS[0], PLUGIN_VERSION, PLUGIN_NAMESPACE)
    return registry.get_plugin_creator(PLUGIN_OPS[0], PLUGIN_VERSION, PLUGIN_NAMESPACE)


def _make_logger(trt, verbose: bool = False):
    class _Logger(trt.ILogger):
        """Keeps errors for our exception message and prints warnings and worse."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                print(f"[TensorRT] ERROR: {msg}", flush=True)
            elif severity == trt.ILogger.WARNING:
                self.warnings.append(msg)
                print(f"[TensorRT] WARNING: {msg}", flush=True)
            elif verbose:
                print(f"[TensorRT] {msg}", flush=True)

    return _Logger()


def _profile_shapes(inputs, min_shapes, opt_shapes, max_shapes):
    """Min/opt/max per dynamic input. Missing min and max default to opt and missing opt to max
    (as trtexec); every dynamic input needs at least one of them."""
    mins, opts, maxs = (_as_shapes(min_shapes, "min_shapes"), _as_shapes(opt_shapes, "opt_shapes"),
                        _as_shapes(max_shapes, "max_shapes"))
    names = {name for name, _ in inputs}
    for what, spec in (("min_shapes", mins), ("opt_shapes", opts), ("max_shapes", maxs)):
        unknown = sorted(set(spec) - names)
        if unknown:
            raise MQUserError(f"{what} names {unknown}, which are not network inputs; inputs are {sorted(names)}")
    profile = {}
    for name, shape in inputs:
        dynamic = any(d < 0 for d in shape)
        if not (name in mins or name in opts or name in maxs):
            if dynamic:
                raise MQUserError(
                    f"input {name!r} has dynamic shape {list(shape)} (-1 = set at run time) and no shape was given; "
                    f"pass min/opt/max shapes, e.g. --minShapes {name}:{'x'.join('1' if d < 0 else str(d) for d in shape)}"
                    f" --maxShapes {name}:<largest>")
            continue
        opt = opts.get(name) or maxs.get(name) or mins.get(name)
        lo, hi = mins.get(name, opt), maxs.get(name, opt)
        for what, s in (("min", lo), ("opt", opt), ("max", hi)):
            if len(s) != len(shape):
                raise MQUserError(f"{what} shape of {name!r} is {list(s)} (rank {len(s)}) but the input has "
                                  f"rank {len(shape)}: {list(shape)}")
            for i, (d, want) in enumerate(zip(s, shape)):
                if want >= 0 and d != want:
                    raise MQUserError(f"{what} shape of {name!r} is {list(s)}, but dimension {i} is fixed to {want}")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise MQUserError(f"shapes of {name!r} must satisfy min <= opt <= max per dimension; got "
                              f"min {list(lo)}, opt {list(opt)}, max {list(hi)}")
        profile[name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


# Words of the inspector's "Format/Datatype" strings ("Row major linear FP32", "... Int8 ...").
_PRECISION_TOKENS = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                     "bf16": "bfloat16", "bfloat16": "bfloat16", "int8": "int8", "fp8": "fp8", "int4": "int4",
                     "fp4": "fp4", "int32": "int32", "int64": "int64", "bool": "bool"}


def _layer_report(trt, engine) -> list[dict]:
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # profiling verbosity below DETAILED gives names only
            layers.append({"name": layer, "type": None, "precision": None})
            continue
        precisions = []
        for out in layer.get("Outputs", []):
            fmt = out.get("Format/Datatype", "") if isinstance(out, dict) else ""
            for token in re.findall(r"[A-Za-z]+\d*", fmt):
                p = _PRECISION_TOKENS.get(token.lower())
                if p is not None:
                    precisions.append(p)
                    break
        layers.append({"name": layer.get("Name"), "type": layer.get("LayerType"),
                       "precision": ",".join(dict.fromkeys(precisions)) or None})
    return layers


def build_engine(onnx_path, out_path, *, int8: bool = True, fp16: bool = False,
                 min_shapes=None, opt_shapes=None, max_shapes=None,
                 plugins: Sequence[str | os.PathLike] = (), timing_cache=None, workspace: int | None = None,
                 strongly_typed: bool | None = None, verbose: bool = False) -> dict:
    """Build a serialized TensorRT engine from an mq-deploy ONNX file.

    onnx_path: the exported model (function bodies and all; it is not modified).
    out_path: where the engine goes (written atomically).
    int8 / fp16: trtexec's flags; see the module docstring for their meaning with strong typing.
    min/opt/max_shapes: 'name:AxB,...' strings (trtexec) or dicts name -> shape, for dynamic inputs.
    plugins: plugin libraries; default $MQ_SCAN_TRT_PLUGIN or the CMake build folder. Only needed when
        the model has mq::SelectiveScan nodes.
    timing_cache: path of a timing cache, read if it exists and written back after the build.
    workspace: builder workspace limit in bytes (None: TensorRT's default, the device memory).
    strongly_typed: None picks True unless fp16 is asked for.
    Returns a report dict (engine path and size, build seconds, inputs, profile, layers, ...).
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise MQUserError(f"ONNX file not found: {onnx_path}")
    if workspace is not None and (not isinstance(workspace, (int, np.integer)) or workspace <= 0):
        raise MQUserError(f"workspace must be a positive number of bytes, got {workspace!r}")
    if strongly_typed is None:
        strongly_typed = not fp16
    if strongly_typed and fp16:
        raise MQUserError("fp16=True needs a weakly typed network (strongly_typed=False): a strongly typed network "
                          "takes every precision from the ONNX, and TensorRT refuses the FP16 flag for it. Export "
                          "fp16 tensors instead, or drop strongly_typed=True.")
    trt = _import_tensorrt()
    import onnx

    # Without external data: the stripped copy is written next to the original, so the relative
    # locations of any external weights still resolve.
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a corrupt file
        raise MQUserError(f"cannot read {onnx_path} as ONNX: {e}") from None
    n_scan = count_plugin_nodes(model)
    stripped, removed = strip_function_bodies(model)
    n_fp16 = _set_scan_out_dtype(stripped, onnx.TensorProto.FLOAT16) if (fp16 and not strongly_typed) else 0

    report: dict = {"onnx": str(onnx_path), "engine": str(out_path), "tensorrt_version": trt.__version__,
                    "strongly_typed": bool(strongly_typed), "scan_nodes": n_scan,
                    "stripped_functions": removed, "scan_nodes_fp16": n_fp16, "warnings": []}

    plugin_paths = find_plugin_library(plugins)
    if n_scan and not plugin_paths:
        raise MQUserError(f"{onnx_path} has {n_scan} mq::SelectiveScan node(s), which TensorRT runs through the "
                          f"plugin library {PLUGIN_LIBRARY}, and none was found; {_BUILD_PLUGIN}")
    logger = _make_logger(trt, verbose)
    if plugin_paths:
        load_plugins(trt, plugin_paths)
        if n_scan and _scan_creator(trt) is None:
            raise MQUserError(f"loaded {', '.join(plugin_paths)} but no plugin creator {PLUGIN_OPS[0]} version "
                              f"{PLUGIN_VERSION} namespace '{PLUGIN_NAMESPACE}' is registered: is it an "
                              f"{PLUGIN_LIBRARY} built from this mq-deploy?")
    report["plugins"] = plugin_paths

    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)

    with _parser_copy(stripped, onnx_path) as tmp_onnx:
        ok = parser.parse_from_file(tmp_onnx)
    if not ok:
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = getattr(err, "node_name", lambda: "")() or getattr(err, "node", lambda: "")()
            errors.append(f"{err.desc()}" + (f" (node {node})" if node not in ("", -1, None) else ""))
        raise MQUserError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errors or logger.errors))

    inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs.append((t.name, tuple(int(d) for d in t.shape)))
    profile_shapes = _profile_shapes(inputs, min_shapes, opt_shapes, max_shapes)

    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    precision_flags = []
    if not strongly_typed:
        # Weakly typed: the Q/DQ nodes still fix the int8 layers; FP16 lets TensorRT choose fp16
        # for the rest. Both flags are deprecated since TensorRT 10.12 (superseded by strong typing).
        for name, wanted in (("INT8", int8), ("FP16", fp16)):
            if wanted:
                flag = getattr(trt.BuilderFlag, name, None)
                if flag is None:
                    raise MQUserError(f"this TensorRT ({trt.__version__}) has no BuilderFlag.{name}: weakly typed "
                                      "builds are gone; build strongly typed (fp16=False) from an ONNX with the "
                                      "precisions you want")
                config.set_flag(flag)
                precision_flags.append(name)
    elif int8 and not any(n.op_type == "QuantizeLinear" for n in model.graph.node) and not n_scan:
        report["warnings"].append("int8 requested but the ONNX has no QuantizeLinear node: a strongly typed "
                                  "network of it runs in the ONNX's float types")
    report["precision_flags"] = precision_flags

    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    report["inputs"] = [{"name": n, "shape": list(s)} for n, s in inputs]
    report["profile"] = {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in profile_shapes.items()}

    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise MQUserError(f"timing cache {cache_path} was rejected (made by another TensorRT version or GPU?); "
                              "delete it to start a new one")
    report["timing_cache"] = str(cache_path) if cache_path is not None else None

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    report["build_seconds"] = round(time.perf_counter() - t0, 3)
    if serialized is None:
        raise MQUserError("TensorRT could not build the engine: " + ("; ".join(logger.errors[-5:])
                                                                     or "no error was logged"))
    engine_bytes = bytes(memoryview(serialized))
    _write_atomic(out_path, engine_bytes)
    report["engine_bytes"] = len(engine_bytes)
    if cache_path is not None:
        _write_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        report["layers"] = _layer_report(trt, engine) if engine is not None else []
    except Exception as e:  # the report is a courtesy; the engine is already written
        report["layers"] = []
        report["warnings"].append(f"layer report unavailable: {e}")
    report["warnings"].extend(logger.warnings)
    return report


# ---- runner ---------------------------------------------------------------------------------------

class _CudaRuntime:
    """Device buffers through cuda-python (preferred: no torch on a deployment box) or torch."""

    def __init__(self, device: int = 0):
        self.kind = None
        try:
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                from cuda import cudart  # older cuda-python
            self.cudart, self.kind = cudart, "cuda-python"
        except ImportError:
            try:
                import torch
            except ImportError:
                torch = None
            if torch is None or not torch.cuda.is_available():
                raise MQUserError("TensorRTRunner needs a CUDA binding for device buffers: `pip install cuda-python` "
                                  "(matching your CUDA major version), or a CUDA build of PyTorch") from None
            self.torch, self.kind = torch, "torch"
        if self.kind == "cuda-python":
            self._check(self.cudart.cudaSetDevice(device), "cudaSetDevice")
            self.stream = self._check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
            self.stream_handle = int(self.stream)
        else:
            self.device = self.torch.device("cuda", device)
            self.stream = self.torch.cuda.Stream(device=self.device)
            self.stream_handle = self.stream.cuda_stream
        self._keep: dict[int, object] = {}   # device pointer -> owner (torch tensor, or None for cudaMalloc)

    def _check(self, result, what):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.cudart.cudaGetErrorName(err)[1]
            raise MQUserError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest

    def alloc(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if self.kind == "cuda-python":
            ptr = int(self._check(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._keep[ptr] = None
            return ptr
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)
        self._keep[t.data_ptr()] = t
        return t.data_ptr()

    def h2d(self, ptr: int, arr: np.ndarray) -> None:
        if arr.nbytes == 0:
            return
        if self.kind == "cuda-python":
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(self.cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, kind, self.stream), "cudaMemcpyAsync")
        else:
            dst = self._keep[ptr]
            with self.torch.cuda.stream(self.stream):
                dst[: arr.nbytes].copy_(self.torch.from_numpy(arr.reshape(-1).view(np.uint8)), non_blocking=False)

    def d2h(self, arr: np.ndarray, ptr: int) -> None:
        if arr.nbytes == 0:
            return
        if self.kind == "cuda-python":
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(self.cudart.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes, kind, self.stream), "cudaMemcpyAsync")
        else:
            src = self._keep[ptr]
            self.stream.synchronize()
            arr.reshape(-1).view(np.uint8)[:] = src[: arr.nbytes].cpu().numpy()

    def sync(self) -> None:
        if self.kind == "cuda-python":
            self._check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        else:
            self.stream.synchronize()

    def free_all(self) -> None:
        if self.kind == "cuda-python":
            for ptr in self._keep:
                self.cudart.cudaFree(ptr)  # synchronizes with the device, so no copy is in flight
        self._keep.clear()


class TensorRTRunner:
    """Runs a serialized engine: `infer({name: array}) -> {name: array}` (numpy in, numpy out).

    plugins: plugin libraries the engine was built with (default as in build_engine; an engine without
    plugin layers needs none). Buffers are allocated per call, which suits verification runs.
    """

    def __init__(self, engine_path, *, plugins: Sequence[str | os.PathLike] = (), device: int = 0):
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise MQUserError(f"engine file not found: {self.engine_path}")
        trt = self._trt = _import_tensorrt()
        self._logger = _make_logger(trt)
        self.plugins = find_plugin_library(plugins)
        if self.plugins:
            load_plugins(trt, self.plugins)
        self._cuda = _CudaRuntime(device)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            hint = "" if self.plugins else f" If it has mq::SelectiveScan layers, load the plugin: {_BUILD_PLUGIN}."
            raise MQUserError(f"TensorRT could not load {self.engine_path} (built by another TensorRT version or for "
                              f"another GPU?): {'; '.join(self._logger.errors[-3:])}.{hint}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise MQUserError(f"could not create an execution context for {self.engine_path}: "
                              + "; ".join(self._logger.errors[-3:]))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]

    def _dtype(self, name):
        try:
            return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
        except TypeError:
            raise MQUserError(f"tensor {name!r} has type {self.engine.get_tensor_dtype(name)}, which numpy cannot "
                              "hold") from None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise MQUserError(f"engine inputs are {self.input_names}; missing {missing}, unknown {extra}")
        ctx, cuda = self.context, self._cuda
        host_inputs = {}
        try:
            for name in self.input_names:
                want = self._dtype(name)
                arr = np.asarray(feeds[name])
                if arr.dtype != want:
                    raise MQUserError(f"input {name!r} is {arr.dtype}, the engine expects {want}")
                arr = np.ascontiguousarray(arr)
                host_inputs[name] = arr
                if not ctx.set_input_shape(name, arr.shape):
                    raise MQUserError(f"input {name!r} shape {list(arr.shape)} is outside the engine's profile "
                                      f"{[list(s) for s in self.engine.get_tensor_profile_shape(name, 0)]} (min, opt, max)")
                if self.engine.is_shape_inference_io(name):
                    ctx.set_tensor_address(name, arr.ctypes.data)  # shape tensors live on the host
                else:
                    ptr = cuda.alloc(arr.nbytes)
                    cuda.h2d(ptr, arr)
                    ctx.set_tensor_address(name, ptr)
            unset = ctx.infer_shapes()
            if unset:
                raise MQUserError(f"shapes of {list(unset)} could not be inferred from the inputs")
            outputs, out_ptrs = {}, {}
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise MQInternalError(f"output {name!r} has a data-dependent shape {shape}; not supported here")
                outputs[name] = np.empty(shape, dtype=self._dtype(name))
                out_ptrs[name] = cuda.alloc(outputs[name].nbytes)
                ctx.set_tensor_address(name, out_ptrs[name])
            if not ctx.execute_async_v3(cuda.stream_handle):
                raise MQUserError("TensorRT execution failed: " + "; ".join(self._logger.errors[-3:]))
            for name, arr in outputs.items():
                cuda.d2h(arr, out_ptrs[name])
            cuda.sync()
            return outputs
        finally:
            cuda.free_all()
