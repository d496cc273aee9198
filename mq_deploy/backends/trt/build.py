"""TensorRT engine build for mq-deploy's ONNX (QDQ int8 + mq::SelectiveScan plugin nodes), through
Polygraphy's TensorRT backend: LoadPlugins -> NetworkFromOnnxPath -> CreateConfig -> EngineBytesFromNetwork.

Our code only picks the options and reports: it strips the scan function bodies (export.surgery), turns
trtexec-style shapes into one optimization profile (checked against the ONNX inputs before TensorRT
is touched), writes the engine and the timing cache through mq_deploy.fileio, and lists layers and
precisions. Everything that talks to TensorRT is Polygraphy's.

Precision. Networks are built STRONGLY_TYPED by default (explicit quantization): the Q/DQ pairs and
tensor types in the ONNX carry every precision, and TensorRT refuses the INT8/FP16 builder flags for
such networks, so `int8=True` only states what the graph already is. `fp16=True` needs a weakly typed
network (chosen when strongly_typed is None): TensorRT may run the layers outside Q/DQ in fp16, and
the scan nodes are switched to out_dtype=10 (fp16 y). Weakly typed networks are deprecated since 10.12.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from mq_deploy.errors import MQUserError
from mq_deploy.export.surgery import count_plugin_nodes, set_scan_out_dtype, strip_function_bodies

MAX_DIM = 2 ** 31 - 1          # TensorRT dimensions are int32

INSTALL_TENSORRT = (
    "Install TensorRT's Python bindings: on x86-64 `pip install tensorrt` (NVIDIA's wheels; the version must "
    "match the CUDA driver), on Jetson the JetPack package `sudo apt install python3-libnvinfer`. "
    "A TensorRT build also needs a GPU and the mq::SelectiveScan plugin library, built with "
    "`cmake -S plugins/selective_scan -B build/scan -DTensorRT_ROOT=<TensorRT dir> && "
    "cmake --build build/scan -j` (JetPack: -DTensorRT_ROOT=/usr). To deploy without TensorRT, "
    "build for ONNX Runtime instead: `mq-deploy build MODEL.onnx --int8 --backend onnxruntime`."
)


# ---- shapes (pure Python, checked before TensorRT is imported) -------------------------------------

_DIMS_RE = re.compile(r"^\d+(x\d+)*$")


def parse_shapes(spec: str | None) -> dict[str, tuple[int, ...]]:
    """trtexec-style shapes, `name:AxBxC[,name:DxE...]` -> {name: (A, B, C), ...}.

    Names may contain ':' (the dims follow the last one) and may be quoted ('input ids':1x8).
    An empty or None spec gives {}. Every dimension is an integer in [1, 2^31 - 1].
    """
    if spec is None or not str(spec).strip():
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
            raise MQUserError(f"bad dimensions {dims!r} for {name!r} in {spec!r}: expected positive "
                              "integers joined by 'x', e.g. 8x256")
        if name in out:
            raise MQUserError(f"input {name!r} appears twice in {spec!r}; give each input once per shape spec "
                              "(min, opt and max shapes are separate specs)")
        out[name] = _check_dims(name, tuple(int(d) for d in dims.split("x")), spec)
    return out


def _check_dims(name, dims, spec) -> tuple:
    for d in dims:
        if d < 1:
            raise MQUserError(f"shape of {name!r} in {spec!r} has a dimension {d}; every dimension must be >= 1")
        if d > MAX_DIM:
            raise MQUserError(f"shape of {name!r} in {spec!r} has a dimension {d} beyond TensorRT's int32 "
                              f"limit {MAX_DIM}")
    return dims


def as_shapes(value, what: str) -> dict[str, tuple[int, ...]]:
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
            out[str(k)] = _check_dims(k, dims, what)
        return out
    raise MQUserError(f"{what} must be a 'name:AxB,...' string or a dict name -> shape, got {type(value).__name__}")


def profile_shapes(inputs, min_shapes=None, opt_shapes=None, max_shapes=None, require_all: bool = True) -> dict:
    """(min, opt, max) per input from trtexec-style specs. `inputs`: [(name, shape)], shape entries
    ints (fixed) or -1 / None / str (dynamic). Missing min and max default to opt and a missing opt
    to max (as trtexec); every dynamic input needs at least one of them; names must be inputs."""
    mins, opts, maxs = (as_shapes(min_shapes, "min_shapes"), as_shapes(opt_shapes, "opt_shapes"),
                        as_shapes(max_shapes, "max_shapes"))
    names = [name for name, _ in inputs]
    for what, spec in (("--minShapes", mins), ("--optShapes", opts), ("--maxShapes", maxs)):
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise MQUserError(f"{what} names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not "
                              f"an input of the model; inputs are {', '.join(names)}")
    profile = {}
    for name, shape in inputs:
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)
        dynamic = any(d < 0 for d in shape)
        if not (name in mins or name in opts or name in maxs):
            if dynamic and require_all:
                raise MQUserError(
                    f"input {name!r} has dynamic shape {list(shape)} (-1 = set at run time) and no shape was given; "
                    f"pass min/opt/max shapes, e.g. --minShapes "
                    f"{name}:{'x'.join('1' if d < 0 else str(d) for d in shape)}"
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
            raise MQUserError(f"shapes of {name!r} must satisfy min <= opt <= max in every dimension; got "
                              f"min {list(lo)}, opt {list(opt)}, max {list(hi)}")
        profile[name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


# ---- TensorRT (through Polygraphy, lazy) ------------------------------------------------------------

def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MQUserError(f"TensorRT is not available in this Python ({e}). {INSTALL_TENSORRT}") from None
    if not hasattr(trt, "Builder"):
        # The PyPI name without NVIDIA's index can resolve to a placeholder package.
        raise MQUserError(f"the installed 'tensorrt' module ({getattr(trt, '__file__', '?')}) has no Builder: "
                          f"it is a placeholder, not TensorRT. {INSTALL_TENSORRT}")
    return trt


def polygraphy_error(e: Exception, what: str) -> MQUserError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return MQUserError(f"{what}: {lines[-1] if lines else type(e).__name__}")


def load_plugins(paths: Sequence[str]) -> None:
    """Polygraphy's LoadPlugins (dlopen), then our creator's registration (see plugins.register_creators)."""
    from polygraphy.backend.trt import LoadPlugins

    from mq_deploy.backends.trt.plugins import register_creators

    if paths:
        LoadPlugins(plugins=list(paths))()
        register_creators(paths)


# Words of the inspector's "Format/Datatype" strings ("Row major linear FP32", "... Int8 ...").
_PRECISION_TOKENS = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                     "bf16": "bfloat16", "bfloat16": "bfloat16", "int8": "int8", "fp8": "fp8", "int4": "int4",
                     "fp4": "fp4", "int32": "int32", "int64": "int64", "bool": "bool"}


def layer_report(engine_info_json: str) -> list[dict]:
    """Layers and their output precisions from IEngineInspector's JSON (DETAILED verbosity)."""
    info = json.loads(engine_info_json)
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


@dataclass
class EngineBuildConfig:
    """What `mq-deploy build --backend tensorrt` asks of TensorRT (trtexec's flag names in the CLI)."""

    int8: bool = True
    fp16: bool = False
    min_shapes: object = None
    opt_shapes: object = None
    max_shapes: object = None
    plugins: Sequence[str] = field(default_factory=tuple)
    timing_cache: str | None = None
    workspace: int | None = None          # bytes; None = TensorRT's default (the device memory)
    strongly_typed: bool | None = None    # None: True unless fp16
    verbose: bool = False
    overwrite: bool = False
    # a hybrid's step graph for Triton's implicit state: the engine is built from the copy whose KV caches
    # carry Triton's start slot (serve.kv_sentinel), as `triton --backend onnxruntime` serves it
    kv_slot: bool = False
    # a pure SSM step graph for Triton's batching of implicit state: the engine is built from the copy whose
    # states are batch-first (serve.batch_first), as `triton --backend onnxruntime` serves it
    batch_states: bool = False

    def __post_init__(self):
        if self.kv_slot and self.batch_states:
            raise MQUserError("--kv-slot (a hybrid's KV caches) and --batch-states (a pure SSM graph's states) "
                              "exclude each other: Triton cannot batch caches of different lengths")
        if self.workspace is not None and (not isinstance(self.workspace, int) or self.workspace <= 0):
            raise MQUserError(f"workspace must be a positive number of bytes, got {self.workspace!r}")
        if self.strongly_typed is None:
            self.strongly_typed = not self.fp16
        if self.strongly_typed and self.fp16:
            raise MQUserError("fp16 needs a weakly typed network: a strongly typed network takes every precision "
                              "from the ONNX, and TensorRT refuses the FP16 flag for it")
        self.plugins = tuple(self.plugins or ())


def plan_build(onnx_path, out_path, cfg: EngineBuildConfig) -> dict:
    """Everything decided before TensorRT is touched: the stripped model, the profile, the plugin
    libraries, the output checks. Pure (no TensorRT), so the option mapping is testable anywhere."""
    import onnx

    from mq_deploy import fileio
    from mq_deploy.backends.trt.plugins import find_plugin_library
    from mq_deploy.export.onnx_file import graph_inputs, load_onnx

    onnx_path, out_path = os.fspath(onnx_path), os.fspath(out_path)
    model = load_onnx(onnx_path, load_external_data=False)
    inputs = [onnx_path, onnx_path + ".data"] + list(cfg.plugins)
    out = fileio.check_target(out_path, cfg.overwrite, inputs, "engine")
    if cfg.timing_cache is not None:
        fileio.check_target(cfg.timing_cache, True, [onnx_path, out], "timing cache", inout=True)
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        raise MQUserError(f"{onnx_path}: its int4 linears are ONNX Runtime's com.microsoft.MatMulNBits, which "
                          "TensorRT does not parse; export the TensorRT file with `mq-deploy export --int4-format qdq`")
    n_scan = count_plugin_nodes(model)
    stripped, removed = strip_function_bodies(model)
    n_fp16 = set_scan_out_dtype(stripped, onnx.TensorProto.FLOAT16) if (cfg.fp16 and not cfg.strongly_typed) else 0
    plugin_paths = find_plugin_library(cfg.plugins)
    names = [(n, s) for n, _, s in graph_inputs(model)]
    shapes = (cfg.min_shapes, cfg.opt_shapes, cfg.max_shapes)
    if cfg.kv_slot:
        shapes = _kv_slot(onnx_path, stripped, names, shapes)
    if cfg.batch_states:
        names, shapes = _batch_states(onnx_path, stripped, shapes)
    # every given shape is checked now; a dynamic input left without one only after TensorRT is found
    profile = profile_shapes(names, *shapes, require_all=False)
    warnings = []
    if cfg.int8 and not any(n.op_type == "QuantizeLinear" for n in model.graph.node) and not n_scan:
        warnings.append("int8 requested but the ONNX has no QuantizeLinear node: a strongly typed network of it "
                        "runs in the ONNX's float types")
    plan = {"onnx": os.path.abspath(onnx_path), "engine": out, "model": stripped, "scan_nodes": n_scan,
            "stripped_functions": removed, "scan_nodes_fp16": n_fp16, "inputs": names, "profile": profile,
            "plugins": plugin_paths, "warnings": warnings}
    if cfg.kv_slot:
        plan["kv_cache"] = "sentinel"
    if cfg.batch_states:
        plan["state_layout"] = "batch_first"
    return plan


def _step_layout(onnx_path, stripped, flag: str, copy_of) -> list:
    """The state layout (families.state_inputs) of the decode-step export `stripped` is, for a flag that
    rewrites it; one line when it is not an export's step graph (copy_of(parsed): already a repository copy)."""
    from mq_deploy.backends.base import parse_metadata
    from mq_deploy.export.onnx_file import metadata
    from mq_deploy.families import state_inputs

    meta = metadata(stripped)
    parsed = parse_metadata(meta, os.fspath(onnx_path)) if "mq.config" in meta else None
    if parsed is None or parsed.graph != "step" or copy_of(parsed):
        raise MQUserError(f"{flag}: {onnx_path} is not a decode-step export (`mq-deploy export --decode-step`)")
    return state_inputs(parsed.config)


def _ids_profile(shapes, flag: str, what: str) -> tuple:
    """The (min, opt, max) shape specs as dicts, and input_ids' shape at each ({"min": (B, L), ...}; a missing
    one from the others), which the states' profile follows (what: the states, for the one line)."""
    lo, opt, hi = (dict(as_shapes(x, w)) for x, w in zip(shapes, ("min_shapes", "opt_shapes", "max_shapes")))
    ids = {k: d["input_ids"] for k, d in (("min", lo), ("opt", opt), ("max", hi)) if "input_ids" in d}
    if not ids:
        raise MQUserError(f"{flag}: give input_ids' shapes (--minShapes/--optShapes/--maxShapes input_ids:BxL); "
                          f"{what} follows them")
    return (lo, opt, hi), {k: ids.get(k) or ids.get("opt") or ids.get("max") or ids.get("min")
                           for k in ("min", "opt", "max")}


def _batch_states(onnx_path, stripped, shapes) -> tuple:
    """--batch-states: rewrite `stripped` (the parser's copy) as serve.batch_first does, and give every state
    input without shapes of its own a profile whose batch (now dimension 0) is input_ids'. Returns the
    rewritten graph's (name, shape) inputs and the (min, opt, max) shape specs with the states' added."""
    from mq_deploy.export.onnx_file import graph_inputs
    from mq_deploy.serve.batch_first import batch_first_proto

    layout = _step_layout(onnx_path, stripped, "--batch-states", lambda parsed: parsed.state_layout is not None)
    if any("past" in si.dims for si in layout):
        raise MQUserError(f"--batch-states: {onnx_path} has KV caches, which Triton cannot batch (their lengths "
                          "differ per sequence); build it with --kv-slot, one sequence per request")
    batch_first_proto(stripped, [(si.name, si.output) for si in layout])
    names = [(n, s) for n, _, s in graph_inputs(stripped)]
    (lo, opt, hi), ids = _ids_profile(shapes, "--batch-states", "the states' batch")
    dims = dict(names)
    for si in layout:
        if any(si.name in d for d in (lo, opt, hi)):
            continue
        for k, d in (("min", lo), ("opt", opt), ("max", hi)):
            d[si.name] = (ids[k][0],) + tuple(int(x) for x in dims[si.name][1:])
    return names, (lo, opt, hi)


def _kv_slot(onnx_path, stripped, names, shapes) -> tuple:
    """--kv-slot: rewrite `stripped` (the parser's copy) as serve.kv_sentinel does, and give every state input
    without shapes of its own a profile from input_ids': its batch as input_ids', a KV cache's length from 1
    (Triton's start slot) to 1 + input_ids' longest length (opt: 1 + its opt), i.e. input_ids' shapes bound
    the context a sequence may reach. Returns the (min, opt, max) shape specs with the states' added."""
    from mq_deploy.serve.kv_sentinel import sentinel_proto

    layout = _step_layout(onnx_path, stripped, "--kv-slot", lambda parsed: parsed.kv_cache == "sentinel")
    caches = [si for si in layout if "past" in si.dims]
    if not caches:
        raise MQUserError(f"--kv-slot: {onnx_path} has no KV cache (only a hybrid's decode step has one); build "
                          "without it")
    sentinel_proto(stripped, [(si.name, si.output, si.dims.index("past")) for si in caches])
    (lo, opt, hi), ids = _ids_profile(shapes, "--kv-slot", "the KV caches' profile")
    dims = dict(names)
    for si in layout:           # every state: its batch as input_ids'; a cache's length as above
        if any(si.name in d for d in (lo, opt, hi)):
            continue
        batch, past = si.dims.index("batch"), si.dims.index("past") if "past" in si.dims else None
        for k, d in (("min", lo), ("opt", opt), ("max", hi)):
            b, length = ids[k]
            d[si.name] = tuple(b if j == batch else (1 if k == "min" else 1 + length) if j == past else int(x)
                               for j, x in enumerate(dims[si.name]))
    return lo, opt, hi


def require_plugin(plan: dict, onnx_path) -> None:
    from mq_deploy.backends.trt.plugins import BUILD_PLUGIN_HINT, PLUGIN_LIBRARY

    if plan["scan_nodes"] and not plan["plugins"]:
        raise MQUserError(f"{onnx_path} has {plan['scan_nodes']} mq::SelectiveScan node(s), which TensorRT runs "
                          f"through the plugin library {PLUGIN_LIBRARY}, and none was found; {BUILD_PLUGIN_HINT}")


def build_engine(onnx_path, out_path, cfg: EngineBuildConfig | None = None, **kw) -> dict:
    """Build a serialized TensorRT engine from an mq-deploy ONNX file (not modified) and write it
    atomically; returns the report (engine path and size, build seconds, inputs, profile, layers)."""
    cfg = cfg or EngineBuildConfig(**kw)
    plan = plan_build(onnx_path, out_path, cfg)
    trt = import_tensorrt()
    require_plugin(plan, onnx_path)
    profile_shapes(plan["inputs"], cfg.min_shapes, cfg.opt_shapes, cfg.max_shapes)
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        EngineFromBytes,
        NetworkFromOnnxPath,
        Profile,
    )
    from polygraphy.exception import PolygraphyException

    from mq_deploy import fileio
    from mq_deploy.backends.trt.plugins import PLUGIN_LIBRARY, scan_creator

    report = {k: v for k, v in plan.items() if k not in ("model", "inputs", "profile")}
    report.update({"tensorrt_version": trt.__version__, "strongly_typed": bool(cfg.strongly_typed),
                   "inputs": [{"name": n, "shape": [d if isinstance(d, int) else -1 for d in s]}
                              for n, s in plan["inputs"]],
                   "profile": {n: {"min": list(a), "opt": list(b), "max": list(c)}
                               for n, (a, b, c) in plan["profile"].items()},
                   "precision_flags": [] if cfg.strongly_typed else [f for f, on in (("INT8", cfg.int8),
                                                                                     ("FP16", cfg.fp16)) if on],
                   "timing_cache": cfg.timing_cache})
    try:
        load_plugins(plan["plugins"])
        if plan["scan_nodes"] and scan_creator(trt) is None:
            raise MQUserError(f"loaded {', '.join(plan['plugins'])} but no mq::SelectiveScan creator is registered "
                              f"in TensorRT: is it an {PLUGIN_LIBRARY} built from this mq-deploy?")
        # The parser reads a file, so external-data locations resolve: a stripped copy beside the original
        # (written a tensor at a time: an inline model is not serialized whole beside itself).
        from mq_deploy.export.onnx_file import write_model

        parser_copy = fileio.temp_path(os.path.abspath(os.fspath(onnx_path)))
        try:
            write_model(plan["model"], parser_copy)
            builder, network, parser = NetworkFromOnnxPath(parser_copy, strongly_typed=cfg.strongly_typed)()
        finally:
            if os.path.exists(parser_copy):
                os.remove(parser_copy)
        profiles = []
        if plan["profile"]:
            prof = Profile()
            for name, (lo, opt, hi) in plan["profile"].items():
                prof.add(name, min=lo, opt=opt, max=hi)
            profiles = [prof]
        cache_in = cfg.timing_cache if cfg.timing_cache and os.path.isfile(cfg.timing_cache) else None
        config = CreateConfig(
            int8=None if cfg.strongly_typed else cfg.int8, fp16=None if cfg.strongly_typed else cfg.fp16,
            profiles=profiles or None, load_timing_cache=cache_in,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: cfg.workspace} if cfg.workspace else None,
            profiling_verbosity=trt.ProfilingVerbosity.DETAILED)(builder, network)
        t0 = time.perf_counter()
        engine_bytes = bytes(EngineBytesFromNetwork((builder, network, parser), config=config)())
        report["build_seconds"] = round(time.perf_counter() - t0, 3)
    except PolygraphyException as e:
        raise polygraphy_error(e, f"TensorRT could not build {onnx_path}") from None
    fileio.write_bytes(plan["engine"], engine_bytes, overwrite=cfg.overwrite, sidecar=True,
                       inputs=[os.fspath(onnx_path)])
    report["engine_bytes"] = len(engine_bytes)
    if cfg.timing_cache:
        cache = config.get_timing_cache()
        if cache is not None:
            fileio.write_bytes(cfg.timing_cache, bytes(memoryview(cache.serialize())), overwrite=True, inout=True)
    try:
        engine = EngineFromBytes(engine_bytes)()
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        report["layers"] = layer_report(info)
    except Exception as e:  # the report is a courtesy; the engine is already written
        report["layers"] = []
        report["warnings"].append(f"layer report unavailable: {e}")
    return report


def check_int8(onnx_path: str, int8: bool) -> None:
    """--int8 on a float32 export is a mistake worth one line, before any build starts."""
    from mq_deploy.export.onnx_file import load_onnx

    nodes = load_onnx(onnx_path, load_external_data=False).graph.node if int8 else ()
    if int8 and not any(n.op_type == "QuantizeLinear" for n in nodes):
        raise MQUserError(f"{onnx_path}: --int8 asks for an int8 build, but the graph has no QuantizeLinear nodes "
                          "(a float32 export); quantize first: mq-deploy quantize MODEL -o QDIR && "
                          "mq-deploy export QDIR -o model.onnx")
