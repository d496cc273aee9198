"""`mq-deploy triton`: a Triton Inference Server model repository for mq-deploy artifacts.

One model per artifact, `NAME/config.pbtxt` + `NAME/1/<model file>`, and, where they apply:
- LM decode-step graph -> NAME (sequence batcher; the state of each sequence stays on the server) and
  NAME_generate (a decoupled Python model that streams the generated tokens; it runs the step graph itself,
  or through BLS requests to NAME);
- Vim -> NAME (classifier, labels.txt) and NAME_preprocess (Python: encoded PNG/JPEG -> normalised
  tensor) + NAME_image (an ensemble of the two);
- a README at the root (the exact tritonserver commands) and one per model.

Backends: `onnxruntime` (Triton's ORT backend; the op library through model_operations),
`tensorrt` (a plan from `mq-deploy build`, its shapes and profile taken from the build report JSON),
`python` (our Python-backend models run the ONNX in ONNX Runtime inside the server: the CPU serving
path that runs here with pytriton's tritonserver).

How the step graph keeps its state, per backend (see docs/serving.md):
- onnxruntime / tensorrt: Triton's implicit state. conv_state/conv_state_out and ssm_state/
  ssm_state_out are `sequence_batching.state` pairs with zero initial state; the server feeds each
  sequence's last output state back as its next input state. These backends pass every request
  input to the graph, so no control tensors are declared (the graph has no START input); the START
  flag resets the state to its initial value, END releases it.
- python: Triton's Python backend does not implement implicit state (the state input arrives but
  the backend cannot update it: measured with pytriton's tritonserver), so the model keeps the
  states itself in a dict keyed by the CONTROL_SEQUENCE_CORRID tensor, with START/END/READY control
  tensors, and evicts sequences idle longer than max_sequence_idle_microseconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field

from mq_deploy.errors import MQUserError
from mq_deploy.runtime.apps import MAX_NEW_TOKENS
from mq_deploy.serve.pbtxt import Enum, dumps

BACKENDS = ("python", "onnxruntime", "tensorrt")
GENERATE_STEPS = ("inline", "bls")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
REPO_KIND = "triton-repository"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_models")

# ONNX TensorProto elem_type -> Triton data type
_TRITON_TYPE = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64",
                9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}
SEQUENCE_IDLE_US = 60_000_000
RESPONSE_INTERVAL_US = 10_000     # NAME_generate: how long a stream's tokens may wait to share a response
INT32_MAX = 2 ** 31 - 1           # max_batch_size, instance counts, dims: int32 / int64 fields of Triton's ModelConfig
UINT64_MAX = 2 ** 64 - 1          # max_sequence_idle_microseconds
_PICTURE = os.path.normpath(os.path.join(_MODELS_DIR, "..", "..", "data", "picture.py"))  # the one image transform


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def check_shared_library(flag: str, path: str) -> None:
    """A file that a server can dlopen: an ELF shared object (ET_DYN). The library may be meant for
    another machine (a Jetson), so its architecture is not checked here."""
    if "\n" in path or "\r" in path:
        raise MQUserError(f"{flag} {_short(path)}: a path with a line break cannot be written into a config")
    if not os.path.isfile(path):
        raise MQUserError(f"{flag} {path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(18)
    except OSError as e:
        raise MQUserError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    if head[:4] != b"\x7fELF" or len(head) < 18 or head[5] not in (1, 2):
        raise MQUserError(f"{flag} {path}: not a shared library (no ELF header); give the libmq_scan_ort.so "
                          "that `pip install` builds into mq_deploy/_native/")
    e_type = int.from_bytes(head[16:18], "little" if head[5] == 1 else "big")
    if e_type != 3:
        raise MQUserError(f"{flag} {path}: an ELF file but not a shared library (ELF type {e_type}, a shared "
                          "object is 3)")


_TRITON_FIELD = " (a field of Triton's model config)"
# TritonConfig's integer fields: (lowest, highest, what bounds them)
_INT_FIELDS = {"max_batch": (0, INT32_MAX, _TRITON_FIELD), "instances": (1, INT32_MAX, _TRITON_FIELD),
               "sequence_idle_us": (1, UINT64_MAX, _TRITON_FIELD), "max_sequences": (1, INT32_MAX, _TRITON_FIELD),
               "max_tokens_per_response": (1, MAX_NEW_TOKENS, " (the most tokens a generation makes)"),
               "response_interval_us": (0, 1_000_000, " (1 s)"), "response_streams": (1, 1 << 20, ""),
               "threads": (0, 1024, "")}


@dataclass
class TritonConfig:
    """What `mq-deploy triton` writes. backend None: onnxruntime for ONNX files, tensorrt for engines."""

    name: str | None = None
    max_batch: int = 64
    instances: int = 1
    backend: str | None = None
    custom_op_lib: str | None = None
    labels: str | None = None
    overwrite: bool = False
    sequence_idle_us: int = SEQUENCE_IDLE_US
    max_sequences: int = 64
    # how NAME_generate runs its steps: "inline" (it runs the step graph itself, batched across its
    # generations; Python backend only) or "bls" (a BLS request to the step model per token); None:
    # inline on the Python backend, bls on the others
    generate_step: str | None = None
    # NAME_generate's responses hold every token made since the stream's last response, at most this many
    # (generate_model.py, mq_batch.Outbox; 1: a response per token, the steps wait for the sends)
    max_tokens_per_response: int = 64
    # ... and a stream's tokens wait at most this long for more to share their response (0: none wait)
    response_interval_us: int = RESPONSE_INTERVAL_US
    # ... for up to this many streams; with more waiting, the interval grows in proportion (a response budget
    # shared by all streams: about this many responses per interval)
    response_streams: int = 16
    # ONNX Runtime intra-op threads of each Python-backend model's session (0: ONNX Runtime's default, one per
    # physical core; 1 leaves the other cores to the server, the sender and the clients: best for small models)
    threads: int = 0

    def __post_init__(self):
        for k, (lo, hi, why) in _INT_FIELDS.items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise MQUserError(f"--{k.replace('_', '-')} must be an integer in [{lo}, {hi}]{why}, got {_short(v)}")
        if self.generate_step is not None and self.generate_step not in GENERATE_STEPS:
            raise MQUserError(f"--generate-step {_short(self.generate_step)!r}: choose one of "
                              f"{', '.join(GENERATE_STEPS)}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise MQUserError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.name is not None and not _NAME_RE.match(self.name):
            raise MQUserError(f"--name {self.name!r}: a Triton model name is letters, digits, '_', '-' and '.', "
                              "starting with a letter or digit")
        if self.custom_op_lib is not None:
            check_shared_library("--custom-op-lib", self.custom_op_lib)
        if self.labels is not None and not os.path.isfile(self.labels):
            raise MQUserError(f"--labels {self.labels}: no such file")


@dataclass
class Tensor:
    name: str
    dtype: str            # Triton TYPE_*
    shape: list           # -1 for dynamic dims


@dataclass
class Artifact:
    """An mq-deploy ONNX export or TensorRT engine, read for what a Triton config needs."""

    path: str
    kind: str             # "lm" | "vim"
    graph: str            # "full" | "step"
    meta: dict
    inputs: list
    outputs: list
    engine: str | None = None       # a TensorRT plan
    onnx: str | None = None         # the ONNX file (for an engine: the one it was built from)
    profile: dict = field(default_factory=dict)   # engine: {input: {"min", "opt", "max"}}
    plugins: list = field(default_factory=list)
    data_files: list = field(default_factory=list)  # the ONNX's external-data files, relative to its folder
    # a step graph's states: (input, output, fixed) from its family layout (mq_deploy.families.state_inputs);
    # fixed: an SSM's state of constant shape, not a KV cache that grows along the sequence
    states: list = field(default_factory=list)
    cache_axes: dict = field(default_factory=dict)  # a KV cache input -> its growing axis
    kv_slot: bool = False           # an engine built with --kv-slot: its caches carry Triton's start slot
    batch_first: bool = False       # an engine built with --batch-states: its states are [batch, layers, ...]

    @property
    def config(self) -> dict:
        return self.meta.get("mq.config", {})


def _tensors(values) -> list:
    out = []
    for v in values:
        t = v.type.tensor_type
        dt = _TRITON_TYPE.get(t.elem_type)
        if dt is None:
            raise MQUserError(f"tensor {v.name}: ONNX element type {t.elem_type} has no Triton data type")
        out.append(Tensor(v.name, dt, [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]))
    return out


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _all_tensors(graph):
    """Every TensorProto of a graph: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for at in node.attribute:
            if at.HasField("t"):
                yield at.t
            yield from at.tensors
            if at.HasField("g"):
                yield from _all_tensors(at.g)
            for g in at.graphs:
                yield from _all_tensors(g)


def _external_data_files(proto, path: str) -> list:
    """The external-data files the ONNX names, each a relative path that must stay inside the ONNX's
    folder (the locations are untrusted metadata: `../../etc/shadow` would be copied into the repository)."""
    import onnx

    folder = os.path.dirname(os.path.abspath(path))
    tensors = list(_all_tensors(proto.graph))
    for f in proto.functions:
        for node in f.node:
            for at in node.attribute:
                if at.HasField("t"):
                    tensors.append(at.t)
    found = set()
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        norm = os.path.normpath(loc) if loc else ""
        if (not norm or "\0" in loc or "\n" in loc or os.path.isabs(loc) or norm == "." or norm.split(os.sep)[0] == ".."
                or not _inside(os.path.join(folder, norm), folder)):
            raise MQUserError(f"{path}: tensor {_short(t.name, 40)} keeps its data at {_short(loc)}, outside the "
                              "ONNX file's folder; an external-data file must lie beside the ONNX file")
        if not os.path.isfile(os.path.join(folder, norm)):
            raise MQUserError(f"{path}: its external-data file {norm} is missing (it must lie beside the ONNX file)")
        found.add(norm)
    return sorted(found)


def read_onnx(path: str) -> Artifact:
    import onnx

    if os.path.isdir(path):
        raise MQUserError(f"{path}: is a folder; serve its ONNX export (`mq-deploy export {path} -o MODEL.onnx`, "
                          "with --decode-step for an LM's stateful step graph)")
    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise MQUserError(f"{path}: not a readable ONNX model (truncated or corrupt?): {str(e).splitlines()[0]}") \
            from None
    from mq_deploy.backends.base import parse_metadata
    from mq_deploy.export.onnx_file import metadata

    meta = metadata(proto)
    if "mq.kind" not in meta or "mq.config" not in meta:
        raise MQUserError(f"{path}: no mq-deploy metadata (mq.kind, mq.config); export it with `mq-deploy export`")
    parsed = parse_metadata(meta, path)      # untrusted: every value type- and range-checked, one line if not
    if parsed.kv_cache == "sentinel" or parsed.state_layout == "batch_first":
        what = "its KV caches carry Triton's start slot" if parsed.kv_cache else "its states are batch-first"
        raise MQUserError(f"{path}: a Triton repository's copy of a step graph ({what}); give the export it was "
                          "written from")
    meta["mq.config"] = parsed.config.to_dict()
    meta["mq.graph"] = parsed.graph or "full"
    init = {i.name for i in proto.graph.initializer}
    a = Artifact(path=path, kind=parsed.kind, graph=meta["mq.graph"], meta=meta,
                 inputs=_tensors(i for i in proto.graph.input if i.name not in init),
                 outputs=_tensors(proto.graph.output), onnx=path)
    if a.graph == "step":
        from mq_deploy.families import state_inputs

        layout = state_inputs(parsed.config)
        a.states = [(si.name, si.output, si.spec.stacked) for si in layout]
        a.cache_axes = {si.name: si.dims.index("past") for si in layout if "past" in si.dims}
        names = {t.name for t in a.inputs + a.outputs}
        missing = [n for i, o, _ in a.states for n in (i, o) if n not in names]
        if missing or not a.states:
            raise MQUserError(f"{path}: a decode-step graph of this model has the state inputs/outputs "
                              f"{', '.join(n for i, o, _ in a.states for n in (i, o))}; missing "
                              f"{', '.join(missing) or 'all'}")
    a.data_files = _external_data_files(proto, path)
    return a


def _find_report(engine: str) -> str | None:
    stem = os.path.splitext(engine)[0]
    for p in (engine + ".json", stem + ".json", stem + ".report.json"):
        if os.path.isfile(p):
            return p
    return None


_LAYOUT_HINT = ("keep the engine, the ONNX it was built from and the report in one folder (`mq-deploy build "
                "DIR/MODEL.onnx --int8 --saveEngine DIR/MODEL.plan --json DIR/MODEL.plan.json`)")


def _report_file(report_path: str, here: str, key: str, value) -> str:
    """A path named by a build report (untrusted): relative to the report's folder, and inside it."""
    if not isinstance(value, str) or not value or "\0" in value or "\n" in value:
        raise MQUserError(f"{report_path}: its {key!r} must be a file path, got {_short(value)}")
    p = value if os.path.isabs(value) else os.path.join(here, value)
    if not _inside(p, here):
        raise MQUserError(f"{report_path}: its {key} {_short(value)} lies outside the report's folder {here}; a build "
                          f"report is trusted only for files beside it: {_LAYOUT_HINT}")
    return os.path.realpath(p)


def _report_shape(report_path: str, what: str, v, lo: int) -> list:
    if (not isinstance(v, list) or not v or len(v) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and lo <= d <= INT32_MAX for d in v)):
        raise MQUserError(f"{report_path}: {what} must be a list of 1 to 16 integers >= {lo}, got {_short(v)}")
    return list(v)


def check_report(report_path: str, report) -> dict:
    """The fields of an `mq-deploy build --json` report that `triton` uses, validated as untrusted input:
    {"engine": str, "onnx": str, "inputs": [{"name", "shape"}], "profile": {name: {"min", "opt", "max"}},
    "plugins": [str]}."""
    if not isinstance(report, dict) or not {"engine", "onnx", "inputs"} <= set(report):
        raise MQUserError(f"{report_path}: not an `mq-deploy build --json` report (needs engine, onnx, inputs)")
    inputs = report["inputs"]
    if not isinstance(inputs, list) or not inputs or len(inputs) > 1024:
        raise MQUserError(f"{report_path}: its inputs must be a non-empty list of {{name, shape}}, got "
                          f"{_short(inputs)}")
    shapes = {}
    for i in inputs:
        if not isinstance(i, dict) or not isinstance(i.get("name"), str) or not i["name"] or i["name"] in shapes:
            raise MQUserError(f"{report_path}: each of its inputs must be {{\"name\": a new string, \"shape\": "
                              f"[ints]}}, got {_short(i)}")
        shapes[i["name"]] = _report_shape(report_path, f"input {i['name']!r} shape", i.get("shape"), -1)
    profile = report.get("profile") or {}
    if not isinstance(profile, dict):
        raise MQUserError(f"{report_path}: its profile must be an object {{input: {{min, opt, max}}}}, got "
                          f"{_short(profile)}")
    checked = {}
    for name, p in profile.items():
        if name not in shapes:
            raise MQUserError(f"{report_path}: its profile names {_short(name)}, which is not one of its inputs")
        if not isinstance(p, dict):
            raise MQUserError(f"{report_path}: profile of {name!r} must be {{min, opt, max}}, got {_short(p)}")
        lo, opt, hi = (_report_shape(report_path, f"profile {name!r} {k}", p.get(k), 0) for k in ("min", "opt", "max"))
        if not len(lo) == len(opt) == len(hi) == len(shapes[name]) or \
                not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise MQUserError(f"{report_path}: profile of {name!r} must have min <= opt <= max, each of rank "
                              f"{len(shapes[name])}, got {_short(p, 120)}")
        checked[name] = {"min": lo, "opt": opt, "max": hi}
    plugins = report.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(x, str) and x for x in plugins) or len(plugins) > 64:
        raise MQUserError(f"{report_path}: its plugins must be a list of library paths, got {_short(plugins)}")
    for x in plugins:
        bad = next((c for c in ("\0", "\n", "\r", ";", ",") if c in x), None)
        if bad:
            raise MQUserError(f"{report_path}: plugin path {_short(x)} holds {bad!r}, which Triton's "
                              "--backend-config=tensorrt,plugins=... cannot express (';' separates libraries, ',' "
                              "settings); rename the library's path")
    kv_cache = report.get("kv_cache")
    if kv_cache not in (None, "sentinel"):
        raise MQUserError(f"{report_path}: its kv_cache must be \"sentinel\" (an engine built with --kv-slot) or "
                          f"absent, got {_short(kv_cache)}")
    state_layout = report.get("state_layout")
    if state_layout not in (None, "batch_first"):
        raise MQUserError(f"{report_path}: its state_layout must be \"batch_first\" (an engine built with "
                          f"--batch-states) or absent, got {_short(state_layout)}")
    return {"engine": report["engine"], "onnx": report["onnx"], "shapes": shapes, "profile": checked,
            "plugins": list(plugins), "kv_slot": kv_cache == "sentinel", "batch_first": state_layout is not None}


def read_engine(path: str) -> Artifact:
    """A TensorRT plan, described by the report `mq-deploy build --json` wrote: input shapes and the
    optimization profile from the report, output names/types and the metadata from the ONNX it names.
    `path` is the engine (its report found beside it as ENGINE.json or STEM.json) or the report. The
    report is untrusted: the files it names must lie in its own folder."""
    if path.endswith(".json"):
        report_path = path
    else:
        if not os.path.isfile(path):
            raise MQUserError(f"{path}: no such file")
        report_path = _find_report(path)
        if report_path is None:
            raise MQUserError(f"{path}: a TensorRT engine's shapes cannot be read without TensorRT; pass the build "
                              "report instead (`mq-deploy build MODEL.onnx ... --json REPORT.json`, then "
                              "`mq-deploy triton REPORT.json`), or put it beside the engine as "
                              f"{os.path.basename(path)}.json")
    try:
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise MQUserError(f"{report_path}: not a readable build report JSON ({e})") from None
    rep = check_report(report_path, report)
    here = os.path.dirname(os.path.abspath(report_path))
    engine = _report_file(report_path, here, "engine", rep["engine"])
    if not path.endswith(".json"):      # the engine named on the command line is the one served
        engine = os.path.abspath(path)
    onnx_path = _report_file(report_path, here, "onnx", rep["onnx"])
    if not os.path.isfile(engine):
        raise MQUserError(f"{report_path}: its engine {engine} does not exist")
    if not os.path.isfile(onnx_path):
        raise MQUserError(f"{report_path}: the ONNX it was built from, {onnx_path}, does not exist (its output names "
                          "and mq-deploy metadata are read from it)")
    a = read_onnx(onnx_path)
    shapes = rep["shapes"]
    if set(shapes) != {t.name for t in a.inputs}:
        raise MQUserError(f"{report_path}: engine inputs {sorted(shapes)} differ from those of {onnx_path} "
                          f"{sorted(t.name for t in a.inputs)}")
    for t in a.inputs:
        if len(shapes[t.name]) != len(t.shape):
            raise MQUserError(f"{report_path}: input {t.name} has rank {len(shapes[t.name])}, in {onnx_path} "
                              f"{len(t.shape)}")
        t.shape = shapes[t.name]
    caches = [i for i, _, fixed in a.states if not fixed]
    if rep["kv_slot"] and not caches:
        raise MQUserError(f"{report_path}: says its engine was built with --kv-slot, but {onnx_path} has no KV cache")
    if rep["kv_slot"]:      # the caches' lengths include Triton's start slot: at least 1
        for name in caches:
            p = rep["profile"].get(name)
            axis = a.cache_axes[name]
            if p is None or p["min"][axis] < 1:
                raise MQUserError(f"{report_path}: the profile of {name} must start its length at 1 or more (Triton's "
                                  "start slot) in an engine built with --kv-slot")
    if rep["batch_first"]:  # the states' batch is dimension 0, as input_ids' in the profile, from 1
        if caches or not a.states:
            raise MQUserError(f"{report_path}: says its engine was built with --batch-states, but {onnx_path} is "
                              "not a pure SSM decode step")
        ids = rep["profile"].get("input_ids")
        for name, _, _ in a.states:
            p = rep["profile"].get(name)
            if p is None or ids is None or p["min"][0] != 1 or any(p[k][0] != ids[k][0] for k in ("min", "max")):
                raise MQUserError(f"{report_path}: the profile of {name} must take its batch (dimension 0) from 1, as "
                                  "input_ids' does, in an engine built with --batch-states")
    a.engine, a.profile, a.plugins, a.kv_slot = engine, rep["profile"], rep["plugins"], rep["kv_slot"]
    a.batch_first = rep["batch_first"]
    a.path = path
    return a


def read_artifact(path: str) -> Artifact:
    if path.endswith(ENGINE_SUFFIXES) or path.endswith(".json"):
        return read_engine(path)
    return read_onnx(path)


# ---- configs ---------------------------------------------------------------------------------------

def _io(t: Tensor, dims: list, **extra) -> dict:
    return {"name": t.name, "data_type": Enum(t.dtype), "dims": [int(d) for d in dims], **extra}


def _param(key: str, value) -> dict:
    return {"key": key, "value": {"string_value": str(value)}}


def _engine_dims(a: Artifact, t: Tensor) -> list:
    """Shape of an engine input for the config: fixed where the profile's min == max, else -1."""
    p = a.profile.get(t.name)
    if not p:
        return list(t.shape)
    return [lo if lo == hi else -1 for lo, hi in zip(p["min"], p["max"])]


def _batchable(a: Artifact, backend: str, cfg: TritonConfig) -> int:
    """max_batch_size: > 0 only when every input and output has a dynamic leading batch dimension.
    A step graph: --max-batch on the Python backend, whose model keeps the states and stacks them itself
    (ort_step_model.py, mq_batch.py), and on ONNX Runtime for a pure SSM graph, served as the copy with
    batch-first states (batch_first_states); 0 for TensorRT, whose engine takes the export's [layers, batch,
    ...] states, and for a graph with KV caches (Triton cannot stack caches of different lengths)."""
    if cfg.max_batch == 0:
        return 0
    if a.graph == "step":
        if backend == "tensorrt" and batch_first_states(a, backend, cfg):
            return min(cfg.max_batch, a.profile["input_ids"]["max"][0])
        return cfg.max_batch if backend == "python" or batch_first_states(a, backend, cfg) else 0
    if any(t.shape[:1] != [-1] for t in a.inputs + a.outputs):
        return 0
    if backend == "tensorrt":
        maxes = [a.profile[t.name]["max"][0] for t in a.inputs if t.name in a.profile]
        mins = [a.profile[t.name]["min"][0] for t in a.inputs if t.name in a.profile]
        if not maxes or min(mins) > 1:
            return 0
        return min(cfg.max_batch, min(maxes))
    return cfg.max_batch


def batch_first_states(a: Artifact, backend: str, cfg: TritonConfig) -> bool:
    """Triton batches the implicit states: ONNX Runtime backend, a step graph whose states are all fixed-size
    SSM states, batching on (the repository's model.onnx is serve.batch_first's copy); or a TensorRT engine
    built from that copy (`build --batch-states`)."""
    if a.graph != "step" or cfg.max_batch == 0 or not a.states or not all(fixed for _, _, fixed in a.states):
        return False
    return backend == "onnxruntime" or (backend == "tensorrt" and a.batch_first)


def _instance_group(backend: str, cfg: TritonConfig, profile: bool = False) -> list:
    g = {"count": cfg.instances}
    if backend == "python":
        g["kind"] = Enum("KIND_CPU")
    elif backend == "tensorrt":
        g["kind"] = Enum("KIND_GPU")
        if profile:
            g["profile"] = ["0"]
    return [g]


def _sequence_batching(a: Artifact, backend: str, cfg: TritonConfig) -> dict:
    seq: dict = {"max_sequence_idle_microseconds": cfg.sequence_idle_us,
                 "oldest": {"max_candidate_sequences": cfg.max_sequences, "max_queue_delay_microseconds": 0}}
    if backend == "python":
        seq["control_input"] = [
            {"name": "START", "control": [{"kind": Enum("CONTROL_SEQUENCE_START"), "int32_false_true": [0, 1]}]},
            {"name": "END", "control": [{"kind": Enum("CONTROL_SEQUENCE_END"), "int32_false_true": [0, 1]}]},
            {"name": "READY", "control": [{"kind": Enum("CONTROL_SEQUENCE_READY"), "int32_false_true": [0, 1]}]},
            {"name": "CORRID",
             "control": [{"kind": Enum("CONTROL_SEQUENCE_CORRID"), "data_type": Enum("TYPE_UINT64")}]},
        ]
        return seq
    states = []
    by_name = {t.name: t for t in a.inputs + a.outputs}
    batched = batch_first_states(a, backend, cfg)
    for inp, out, fixed in a.states:
        t = by_name[inp]
        if batched:      # the batch-first copy's [batch, layers, ...]: Triton stacks the sequences in front
            # (an engine's shapes are the report's, already batch-first; the export's are [layers, batch, ...])
            rest = t.shape[1:] if backend == "tensorrt" else [t.shape[0]] + list(t.shape[2:])
            dims = [int(d) for d in rest]
            start = dims
        elif fixed:      # an SSM state [layers, batch, ...]: one sequence per request
            dims = [int(t.shape[0]), 1] + [int(d) for d in t.shape[2:]]
            start = dims
        else:            # a KV cache [batch, kv_heads, past, head_dim] of the serve.kv_sentinel copy: Triton
            # starts its variable length at 1, the slot that copy never attends
            dims = [1] + [d if isinstance(d, int) and d > 0 else -1 for d in t.shape[1:]]
            start = [1 if d == -1 else d for d in dims]
        states.append({"input_name": inp, "output_name": out, "data_type": Enum(t.dtype), "dims": dims,
                       "initial_state": {"data_type": Enum(t.dtype), "dims": start, "zero_data": True,
                                         "name": f"{inp}_zeros"}})
    seq["state"] = states
    return seq


def model_config(a: Artifact, name: str, backend: str, cfg: TritonConfig, model_file: str,
                 op_lib_in_model: str | None = None) -> dict:
    """The config.pbtxt of one artifact's main model, as a dict (pbtxt.dumps writes it)."""
    c: dict = {"name": name}
    if backend == "tensorrt":
        c["platform"] = "tensorrt_plan"
    else:
        c["backend"] = backend
    if backend != "python":
        c["default_model_filename"] = model_file
    mbs = _batchable(a, backend, cfg)
    c["max_batch_size"] = mbs
    state_names = {n for i, o, _ in a.states for n in (i, o)}
    ins, outs = [], []
    for t in a.inputs:
        if t.name in state_names:
            continue
        dims = _engine_dims(a, t) if backend == "tensorrt" else list(t.shape)
        extra = {}
        if a.graph == "step":
            dims = [1] + dims[1:]          # one sequence per request: batch 1
            if mbs and backend == "python":   # a prefill and single-token steps may share an execute(); the
                extra["allow_ragged_batch"] = True   # model groups them (ONNX Runtime's batches are equal-length)
        ins.append(_io(t, dims[1:] if mbs else dims, **extra))
    for t in a.outputs:
        if t.name in state_names:
            continue
        dims = list(t.shape)
        if a.graph == "step":
            dims = [1] + dims[1:]
        extra = {"label_filename": "labels.txt"} if a.kind == "vim" and t.name == "logits" else {}
        outs.append(_io(t, dims[1:] if mbs else dims, **extra))
    c["input"], c["output"] = ins, outs
    if a.graph == "step":
        c["sequence_batching"] = _sequence_batching(a, backend, cfg)
    elif mbs:
        c["dynamic_batching"] = {"max_queue_delay_microseconds": 500}
    c["instance_group"] = _instance_group(backend, cfg, profile=bool(a.profile))
    if backend == "onnxruntime" and cfg.custom_op_lib:
        c["model_operations"] = {"op_library_filename": [os.path.abspath(cfg.custom_op_lib)]}
    if backend == "onnxruntime" and cfg.threads:        # Triton's ORT backend reads it per model
        c["parameters"] = [_param("intra_op_thread_count", cfg.threads)]
    if backend == "python":
        params = _session_params(a, model_file, op_lib_in_model, cfg.threads)
        if a.graph == "step":
            params += [_param("max_sequences", cfg.max_sequences),
                       _param("sequence_idle_us", cfg.sequence_idle_us)]
        c["parameters"] = params
    return c


def _session_params(a: Artifact, model_file: str, op_lib: str | None, threads: int) -> list:
    """What mq_ort_session.make_session reads (the file, threads, the op library) and a step graph's state
    pairs: the Python step model's parameters, and an inline generate model's, which opens that graph."""
    params = [_param("onnx_file", model_file), _param("intra_op_threads", threads)]
    if op_lib:
        params.append(_param("custom_op_library", op_lib))
    if a.graph == "step":
        params.append(_param("states", json.dumps([[i, o] for i, o, _ in a.states])))
    return params


def generate_inline(backend: str, cfg: TritonConfig) -> bool:
    """NAME_generate runs the step graph itself (see TritonConfig.generate_step)."""
    return (cfg.generate_step or ("inline" if backend == "python" else "bls")) == "inline"


def tokenizer_of(a: Artifact):
    """(kind, eos id) of the artifact's tokenizer: "bytes", "tokenizers" (its tokenizer.json is in the
    metadata) or "ids" (none: the generate model takes prompt_ids only)."""
    kind = a.meta.get("mq.tokenizer")
    if kind == "bytes":
        return "bytes", a.config.get("eos_token_id")
    if a.meta.get("mq.tokenizer_json"):
        from mq_deploy.data.tokenizer import tokenizer_for_artifact

        return "tokenizers", tokenizer_for_artifact(a.meta, None, a.path).eos_id
    return "ids", a.config.get("eos_token_id")


def generate_config(a: Artifact, name: str, step_model: str, cfg: TritonConfig, inline_params=None) -> dict:
    """inline_params: the step model's session parameters when this model runs its graph (inline), else None."""
    kind, eos = tokenizer_of(a)
    text = kind != "ids"
    ins = [{"name": "prompt_ids", "data_type": Enum("TYPE_INT64"), "dims": [-1], "optional": True},
           {"name": "max_new_tokens", "data_type": Enum("TYPE_INT32"), "dims": [1], "optional": True}]
    outs = [{"name": "token_id", "data_type": Enum("TYPE_INT64"), "dims": [-1]}]   # the response's new tokens
    if text:
        ins.insert(0, {"name": "text", "data_type": Enum("TYPE_STRING"), "dims": [1], "optional": True})
        outs.append({"name": "text", "data_type": Enum("TYPE_STRING"), "dims": [1]})
    return {"name": name, "backend": "python", "max_batch_size": 0, "input": ins, "output": outs,
            "model_transaction_policy": {"decoupled": True},
            # an instance serves max_generations streams at once (generate_model.py); inline, one instance, so
            # that all generations' steps batch in one process
            "instance_group": [{"count": 1 if inline_params else cfg.instances, "kind": Enum("KIND_CPU")}],
            "parameters": [_param("step_model", step_model), _param("vocab_size", a.config["vocab_size"]),
                           _param("tokenizer", kind), _param("eos_id", "" if eos is None else int(eos)),
                           _param("default_max_new_tokens", 64), _param("max_new_tokens_limit", MAX_NEW_TOKENS),
                           _param("max_generations", cfg.max_sequences),
                           _param("max_tokens_per_response", cfg.max_tokens_per_response),
                           _param("response_interval_us", cfg.response_interval_us),
                           _param("response_streams", cfg.response_streams)]
            + ([_param("step_inline", 1)] + inline_params
               if inline_params else [])}


def preprocess_config(a: Artifact, name: str, cfg: TritonConfig) -> dict:
    c = a.config
    mbs = cfg.max_batch
    dims = [c["in_chans"], c["img_size"], c["img_size"]]
    return {"name": name, "backend": "python", "max_batch_size": mbs,
            "input": [{"name": "image", "data_type": Enum("TYPE_STRING"), "dims": [1]}],
            "output": [{"name": "images", "data_type": Enum("TYPE_FP32"), "dims": dims if mbs else [1] + dims}],
            **({"dynamic_batching": {"max_queue_delay_microseconds": 500}} if mbs else {}),
            "instance_group": [{"count": cfg.instances, "kind": Enum("KIND_CPU")}],
            "parameters": [_param("in_chans", c["in_chans"]), _param("img_size", c["img_size"]),
                           _param("image_mean", json.dumps(list(c["image_mean"]))),
                           _param("image_std", json.dumps(list(c["image_std"])))]}


def ensemble_config(a: Artifact, name: str, preprocess: str, classifier: str, classifier_mbs: int,
                    cfg: TritonConfig) -> dict:
    mbs = min(cfg.max_batch, classifier_mbs) if classifier_mbs else 0
    n = a.config["num_classes"]
    return {"name": name, "platform": "ensemble", "max_batch_size": mbs,
            "input": [{"name": "image", "data_type": Enum("TYPE_STRING"), "dims": [1]}],
            "output": [{"name": "logits", "data_type": Enum("TYPE_FP32"), "dims": [n] if mbs else [1, n]}],
            "ensemble_scheduling": {"step": [
                {"model_name": preprocess, "model_version": -1,
                 "input_map": [{"key": "image", "value": "image"}],
                 "output_map": [{"key": "images", "value": "preprocessed"}]},
                {"model_name": classifier, "model_version": -1,
                 "input_map": [{"key": "images", "value": "preprocessed"}],
                 "output_map": [{"key": "logits", "value": "logits"}]}]}}


# ---- READMEs ---------------------------------------------------------------------------------------

# The READMEs' shell lines: every value that comes from a file or a flag goes through shlex.quote for the
# shell that reads it (twice for the command inside `bash -c '...'`). What no quoting can express in the
# program that finally reads the value (a line break; ',' or ';' inside --backend-config; ':' inside
# docker's -v or LD_PRELOAD) is refused, or its line left out, never written broken.
CONTAINER = "nvcr.io/nvidia/tritonserver:25.01-py3"
PIP_NAMES = {"PIL": "pillow"}       # import name -> pip package, where they differ


def _q(value: str) -> str:
    return shlex.quote(value)


def _refuse_unwritable(what: str, value: str, forbid: str = "", why: str = "") -> None:
    bad = next((c for c in ("\0", "\n", "\r") + tuple(forbid) if c in value), None)
    if bad is not None:
        raise MQUserError(f"{what} {_short(value)} holds {bad!r}, which the repository README's server commands "
                          f"cannot express{why}; choose another name")


def _pip_names(modules) -> list:
    return sorted({PIP_NAMES.get(m, m) for m in modules})


def _root_readme(models: list, repo_name: str, plugins: list, op_lib: str | None, python_modules: dict) -> str:
    lines = ["# Triton model repository (written by mq-deploy)", "",
             "| model | backend | what |", "|---|---|---|"]
    lines += [f"| `{m['name']}` | {m['backend']} | {m['what']} |" for m in models]
    trt = any(m["backend"] == "tensorrt" for m in models)
    plugins = list(plugins) or (["/path/to/libmq_scan_trt.so"] if trt else [])
    repo_arg = repo_name if not repo_name.startswith("-") else "./" + repo_name
    bc = [f"--backend-config=tensorrt,plugins={';'.join(plugins)}"] if trt else []
    server_args = ["--model-repository=/models", *bc]
    pip = _pip_names(set().union(*python_modules.values())) if python_modules else []
    mounts = [f"{repo_name}:/models"]
    if trt:
        mounts += sorted({f"{os.path.dirname(p)}:{os.path.dirname(p)}" for p in plugins})
    docker = ["docker", "run", "--gpus", "all", "--rm", "-p", "8000:8000", "-p", "8001:8001"]
    docker_line = " ".join(_q(x) for x in docker) + " -v \"$PWD\"/" + _q(mounts[0]) + \
        "".join(" -v " + _q(m) for m in mounts[1:]) + " " + CONTAINER + " \\"
    inner = " ".join(_q(x) for x in ["tritonserver", *server_args])
    if pip:
        inner = " ".join(_q(x) for x in ["pip", "install", *pip]) + " && " + inner
        docker_line += "\n  bash -c " + _q(inner)
    else:
        docker_line += "\n  " + inner
    jetson = "/opt/tritonserver/bin/tritonserver --model-repository=\"$PWD\"/" + _q(repo_name) + \
        " --backend-directory=/opt/tritonserver/backends" + "".join(" " + _q(x) for x in bc)
    if pip:
        jetson = " ".join(_q(x) for x in ["pip3", "install", *pip]) + "   # for the Python-backend models\n" + jetson
    lines += ["", "## Start the server", "",
              "On this machine (pytriton's tritonserver, Python backend, CPU; loopback only; `mq-deploy serve "
              "--setup` installs it):", "",
              "```bash", f"mq-deploy serve {_q(repo_arg)} --http-port 8000 --grpc-port 8001", "```", "",
              "In NVIDIA's container on a GPU (the repository mounted at /models; run from its parent folder):", "",
              "```bash", docker_line, "```", "",
              "On Jetson (JetPack 6; Triton's Jetson release `tritonserver<ver>-igpu.tar`, from the Triton GitHub "
              "releases page, unpacked into /opt/tritonserver):", "",
              "```bash", jetson, "```", ""]
    if trt:
        lines += ["TensorRT engines run the mq::SelectiveScan plugin: the commands above load its library with "
                  "`--backend-config=tensorrt,plugins=...` (several: separated by ';'). The library must be built for "
                  "the server's TensorRT version (`plugins/selective_scan/trt/README.md`)."]
        if not any(c in p for p in plugins for c in ": \t"):     # LD_PRELOAD splits on ':' and blanks
            lines += ["Or preload it:", "", "```bash",
                      "LD_PRELOAD=" + _q(":".join(plugins)) + " /opt/tritonserver/bin/tritonserver "
                      "--model-repository=\"$PWD\"/" + _q(repo_name), "```"]
        lines.append("")
    if op_lib:
        lines += [f"ONNX Runtime models load the native scan op from `{os.path.abspath(op_lib)}` "
                  "(model_operations.op_library_filename): that path must exist on the server.", ""]
    lines += ["## Query it", "", "```bash", "curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{http_code}\\n'"]
    for m in models:
        if m.get("curl"):
            lines.append(m["curl"])
    lines += ["```", "", "Each model folder has a README with its inputs, outputs and a tritonclient example.", ""]
    return "\n".join(lines)


def _curl(name: str, body: dict | None = None, body_code: str | None = None, stream: bool = False) -> str:
    """One curl line for the README: a JSON body quoted for the shell, or made by a python3 one-liner."""
    url = f"localhost:8000/v2/models/{name}/" + ("generate_stream" if stream else "infer")
    head = ["curl", "-s"] + (["-N"] if stream else []) + [url]
    if body_code is not None:
        return " ".join(_q(x) for x in ["python3", "-c", body_code]) + " | " + " ".join(_q(x) for x in head) + " -d @-"
    return " ".join(_q(x) for x in head + ["-d", json.dumps(body)])


def _model_readme(name: str, backend: str, what: str, cfg_text: str, example: str, notes=()) -> str:
    return "\n".join([f"# {name}", "", f"{what} (backend: {backend})", "", *notes, "",
                      "## config.pbtxt", "", "```", cfg_text.rstrip(), "```", "",
                      "## Client", "", "```python", example.rstrip(), "```", ""])


def _example_classifier(name: str, a: Artifact, mbs: int) -> str:
    c = a.config
    shape = [1, c["in_chans"], c["img_size"], c["img_size"]]
    return (f"import numpy as np, tritonclient.http as httpclient\n"
            f"client = httpclient.InferenceServerClient('localhost:8000')\n"
            f"x = httpclient.InferInput('images', {shape}, 'FP32')\n"
            f"x.set_data_from_numpy(np.zeros({shape}, np.float32))   "
            f"# normalised with mean/std {c['image_mean']}/{c['image_std']}\n"
            f"out = client.infer('{name}', [x], outputs=[httpclient.InferRequestedOutput('logits', class_count=3)])\n"
            f"print(out.as_numpy('logits'))   # top-3 'score:index:label'")


def _example_step(name: str) -> str:
    return (f"import numpy as np, tritonclient.grpc as grpcclient\n"
            f"client = grpcclient.InferenceServerClient('localhost:8001')\n"
            f"def step(ids, start=False, end=False, seq=1234):\n"
            f"    x = grpcclient.InferInput('input_ids', [1, len(ids)], 'INT64')\n"
            f"    x.set_data_from_numpy(np.asarray([ids], np.int64))\n"
            f"    r = client.infer('{name}', [x], sequence_id=seq, sequence_start=start, sequence_end=end)\n"
            f"    return r.as_numpy('logits')[0, -1]\n"
            f"logits = step(list(b'And God said'), start=True)   # prefill: the state stays on the server\n"
            f"logits = step([int(logits.argmax())])                # one decode step\n"
            f"step([int(logits.argmax())], end=True)               # END releases the sequence's state")


def _example_generate(name: str, text: bool) -> str:
    inp = ("x = grpcclient.InferInput('text', [1], 'BYTES'); x.set_data_from_numpy(np.array([b'And God said'], object))"
           if text else "x = grpcclient.InferInput('prompt_ids', [3], 'INT64'); "
                        "x.set_data_from_numpy(np.array([1, 2, 3], np.int64))")
    return (f"import queue, numpy as np, tritonclient.grpc as grpcclient\n"
            f"client = grpcclient.InferenceServerClient('localhost:8001')\n"
            f"q = queue.Queue()\n"
            f"client.start_stream(callback=lambda result, error: q.put((result, error)))\n"
            f"{inp}\n"
            f"n = grpcclient.InferInput('max_new_tokens', [1], 'INT32')\n"
            f"n.set_data_from_numpy(np.array([40], np.int32))\n"
            f"client.async_stream_infer('{name}', [x, n], enable_empty_final_response=True)\n"
            f"while True:\n"
            f"    result, error = q.get()\n"
            f"    if error: raise error\n"
            f"    if result.get_response().parameters['triton_final_response'].bool_param: break\n"
            f"    print(*result.as_numpy('token_id'), end=' ', flush=True)   # the tokens new since the last response\n"
            f"client.stop_stream()")


def _example_image(name: str) -> str:
    return (f"import numpy as np, tritonclient.http as httpclient\n"
            f"client = httpclient.InferenceServerClient('localhost:8000')\n"
            f"x = httpclient.InferInput('image', [1, 1], 'BYTES')\n"
            f"x.set_data_from_numpy(np.array([[open('picture.png', 'rb').read()]], object))\n"
            f"print(client.infer('{name}', [x]).as_numpy('logits').argmax())")


# ---- the writer ------------------------------------------------------------------------------------

def _default_name(path: str) -> str:
    base = os.path.basename(path)
    for suf in (".json", ".onnx") + ENGINE_SUFFIXES:
        if base.endswith(suf):
            base = base[:-len(suf)]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", base).strip("._-") or "model"
    return name if name[0].isalnum() else "m" + name


def _labels(a: Artifact, cfg: TritonConfig) -> str:
    n = a.config["num_classes"]
    if cfg.labels is None:
        return "".join(f"{i}\n" for i in range(n))
    with open(cfg.labels, encoding="utf-8") as f:
        labels = [line.rstrip("\r\n") for line in f if line.strip()]
    if len(labels) != n:
        raise MQUserError(f"--labels {cfg.labels}: {len(labels)} labels, but {a.path} has {n} classes")
    return "".join(x + "\n" for x in labels)


def _sibling_deps(lib: str) -> list:
    """Shared libraries beside `lib` that it links (libmq_scan_ort.so needs libmq_scan_cpu.so, found
    through RUNPATH $ORIGIN): copied with it so the copy in the model folder loads."""
    folder = os.path.dirname(os.path.abspath(lib))
    with open(lib, "rb") as f:
        data = f.read()
    deps = []
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if (p != os.path.abspath(lib) and ".so" in name and os.path.isfile(p)
                and name.encode() + b"\0" in data):       # a NEEDED entry is a NUL-terminated name
            deps.append(p)
    return deps


def _copy(src: str, dst: str) -> None:
    """Every file a repository takes from elsewhere (engines, ONNX files and their data, libraries, our own
    model code) is copied as `cp` does: the source's permission bits masked by the umask."""
    from mq_deploy.fileio import copy_file

    copy_file(src, dst)


def _copy_onnx(a: Artifact, dest_dir: str) -> str:
    """The ONNX as model.onnx, and its external-data files under the names it gives them (relative to it)."""
    _copy(a.onnx, os.path.join(dest_dir, "model.onnx"))
    src_dir = os.path.dirname(os.path.abspath(a.onnx))
    for rel in a.data_files:
        dst = os.path.join(dest_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _copy(os.path.join(src_dir, rel), dst)
    return "model.onnx"


def plan(artifacts, cfg: TritonConfig) -> list:
    """Check every artifact and flag before anything is written: [(Artifact, name, backend)]."""
    if not artifacts:
        raise MQUserError("give at least one artifact (an ONNX export, or a TensorRT engine / its build report)")
    if cfg.name and len(artifacts) > 1:
        raise MQUserError(f"--name names one model, but {len(artifacts)} artifacts were given (their file names "
                          "become the model names)")
    out, names = [], {}
    for p in artifacts:
        a = read_artifact(str(p))
        backend = cfg.backend or ("tensorrt" if a.engine else "onnxruntime")
        if a.engine and backend != "tensorrt":
            raise MQUserError(f"{p}: a TensorRT engine is served by --backend tensorrt, not {backend}; for "
                              f"--backend {backend} give the ONNX file {a.onnx}")
        if not a.engine and backend == "tensorrt":
            raise MQUserError(f"{p}: --backend tensorrt serves an engine; build one first "
                              f"(`mq-deploy build {p} --int8 --saveEngine MODEL.plan --json MODEL.plan.json`) "
                              "and pass the engine or its report")
        if backend == "tensorrt" and any(not fixed for _, _, fixed in a.states) and not a.kv_slot:
            raise MQUserError(f"{p}: its attention layers' KV caches grow along the sequence; Triton's implicit "
                              "state starts them one slot long, which an engine built from the export misreads; "
                              "build it with `mq-deploy build STEP.onnx --kv-slot ...` (the copy with the slot, "
                              "serve.kv_sentinel), or serve the ONNX with --backend onnxruntime or python")
        if cfg.threads and backend == "tensorrt":
            raise MQUserError(f"{p}: --threads sets ONNX Runtime's intra-op threads (the python and onnxruntime "
                              "backends); a TensorRT engine has none")
        if a.graph == "step" and cfg.generate_step == "inline" and backend != "python":
            raise MQUserError(f"{p}: --generate-step inline runs the step graph inside the Python generate "
                              f"model, so its step model must be the Python backend's too (--backend python), not "
                              f"{backend}; with {backend}, generate with --generate-step bls")
        name = cfg.name or _default_name(str(p))
        extra = [name]
        if a.graph == "step":
            extra.append(name + "_generate")
        if a.kind == "vim":
            extra += [name + "_preprocess", name + "_image"]
        for n in extra:
            if n in names:
                raise MQUserError(f"{p}: model name {n!r} is also used by {names[n]}; rename a file or serve them "
                                  "from two repositories")
            names[n] = p
        out.append((a, name, backend))
    if cfg.custom_op_lib and not any(b in ("python", "onnxruntime") for _, _, b in out):
        raise MQUserError("--custom-op-lib is the ONNX Runtime op library; no model here uses ONNX Runtime")
    return out


def _write_model(root: str, a: Artifact, name: str, backend: str, cfg: TritonConfig, summary: list) -> None:
    mdir = os.path.join(root, name)
    vdir = os.path.join(mdir, "1")
    os.makedirs(vdir)
    op_lib = None
    if backend == "tensorrt":
        model_file = "model.plan"
        _copy(a.engine, os.path.join(vdir, model_file))
    else:
        model_file = _copy_onnx(a, vdir)
        caches = [(i, o) for i, o, fixed in a.states if not fixed]
        if backend == "onnxruntime" and caches:     # Triton's implicit state: the copy with the cache slot
            from mq_deploy.serve.kv_sentinel import write_sentinel_copy

            write_sentinel_copy(a.onnx, os.path.join(vdir, model_file), [(i, o, a.cache_axes[i]) for i, o in caches])
        elif batch_first_states(a, backend, cfg):   # Triton batches implicit states along dimension 0
            from mq_deploy.serve.batch_first import write_batch_first_copy

            write_batch_first_copy(a.onnx, os.path.join(vdir, model_file), [(i, o) for i, o, _ in a.states])
        if backend == "python":
            role = "ort_step_model.py" if a.graph == "step" else "ort_model.py"
            _copy(os.path.join(_MODELS_DIR, role), os.path.join(vdir, "model.py"))
            _copy(os.path.join(_MODELS_DIR, "mq_ort_session.py"), os.path.join(vdir, "mq_ort_session.py"))
            if a.graph == "step":
                _copy(os.path.join(_MODELS_DIR, "mq_batch.py"), os.path.join(vdir, "mq_batch.py"))
            if cfg.custom_op_lib:
                op_lib = os.path.basename(cfg.custom_op_lib)
                for lib in [cfg.custom_op_lib] + _sibling_deps(cfg.custom_op_lib):
                    _copy(lib, os.path.join(vdir, os.path.basename(lib)))
    c = model_config(a, name, backend, cfg, model_file, op_lib)
    text = dumps(c)
    with open(os.path.join(mdir, "config.pbtxt"), "w") as f:
        f.write(text)
    notes = []
    if a.kind == "vim":
        with open(os.path.join(mdir, "labels.txt"), "w") as f:
            f.write(_labels(a, cfg))
        what = f"Vision Mamba classifier, {a.config['num_classes']} classes ({a.path})"
        example = _example_classifier(name, a, c["max_batch_size"])
        shape = [1, a.config["in_chans"], a.config["img_size"], a.config["img_size"]]
        body = ('import json; print(json.dumps({"inputs": [{"name": "images", "shape": %s, "datatype": "FP32", '
                '"data": [0] * %d}], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}))'
                % (shape, math.prod(shape)))
        curl = _curl(name, body_code=body)
    elif a.graph == "step":
        what = f"LM decode step, stateful: the server keeps each sequence's conv/ssm state ({a.path})"
        example = _example_step(name)
        notes.append("State: " + ("kept by the model per CORRID (the Python backend has no implicit state)"
                                  if backend == "python" else
                                  "Triton implicit state (sequence_batching.state, zero at START" +
                                  ("; each KV cache starts as the one zero slot Triton gives a variable-size state, "
                                   "which this copy of the graph (or the engine built with --kv-slot) never attends: "
                                   "mq_deploy/serve/kv_sentinel.py)"
                                   if any(not f for _, _, f in a.states) else
                                   "; this copy of the graph (or the engine built with --batch-states) takes the "
                                   "states batch-first, [batch, layers, ...], so that Triton batches the sequences' "
                                   "steps: mq_deploy/serve/batch_first.py)"
                                   if batch_first_states(a, backend, cfg) else ")"))
                     + ". Send sequence_id, sequence_start on the first request, sequence_end on the last.")
        curl = None
    else:
        what = f"LM, full sequence: input_ids -> logits ({a.path})"
        example = ("import numpy as np, tritonclient.http as httpclient\n"
                   "client = httpclient.InferenceServerClient('localhost:8000')\n"
                   "ids = np.asarray([list(b'And God said')], np.int64)\n"
                   f"x = httpclient.InferInput('input_ids', list(ids.shape), 'INT64'); x.set_data_from_numpy(ids)\n"
                   f"print(client.infer('{name}', [x]).as_numpy('logits').shape)")
        curl = _curl(name, {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64",
                                         "data": [65, 110, 100]}]})
    if backend == "tensorrt":
        notes.append("Shapes and the optimization profile come from the build report of the engine "
                     f"(inputs, profile), output names and types from the ONNX it was built from ({a.onnx}). "
                     "The engine needs the mq::SelectiveScan plugin: see the repository README.")
    with open(os.path.join(mdir, "README.md"), "w") as f:
        f.write(_model_readme(name, backend, what, text, example, notes))
    summary.append({"name": name, "backend": backend, "what": what, "curl": curl, "config": c,
                    "max_batch_size": c["max_batch_size"]})

    if a.graph == "step":
        gname = name + "_generate"
        gdir = os.path.join(root, gname)
        os.makedirs(os.path.join(gdir, "1"))
        _copy(os.path.join(_MODELS_DIR, "generate_model.py"), os.path.join(gdir, "1", "model.py"))
        if tokenizer_of(a)[0] == "tokenizers":
            with open(os.path.join(gdir, "1", "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(a.meta["mq.tokenizer_json"])
        inline = generate_inline(backend, cfg)
        # its outbox and decode engine; inline, it also opens the step model's graph (its folder beside this one)
        for helper in ("mq_batch.py",) + (("mq_ort_session.py",) if inline else ()):
            _copy(os.path.join(_MODELS_DIR, helper), os.path.join(gdir, "1", helper))
        params = _session_params(a, model_file, op_lib, cfg.threads) if inline else None
        gc = generate_config(a, gname, name, cfg, params)
        gtext = dumps(gc)
        with open(os.path.join(gdir, "config.pbtxt"), "w") as f:
            f.write(gtext)
        text_in = tokenizer_of(a)[0] != "ids"
        with open(os.path.join(gdir, "README.md"), "w") as f:
            how = (f"runs the graph of `{name}` itself (from that model's folder), the steps of all its running "
                   "generations batched into one ONNX Runtime call per round" if inline else
                   f"a BLS model that decodes through `{name}`")
            what = (f"Streaming generation: prefills the prompt and decodes greedily (one sequence per request); the "
                    f"first token goes out at once, then each response holds the tokens made since the last one "
                    f"(waiting at most {cfg.response_interval_us} us for more, at most {cfg.max_tokens_per_response}; "
                    f"longer in proportion while more than {cfg.response_streams} streams wait); "
                    f"{how}")
            f.write(_model_readme(gname, "python, decoupled", what, gtext, _example_generate(gname, text_in)))
        prompt = {"text": "And God said"} if text_in else {"prompt_ids": [1, 2, 3]}
        summary.append({"name": gname, "backend": "python (decoupled" + (")" if inline else " BLS)"),
                        "what": f"streams generated tokens through {name}", "config": gc,
                        "curl": _curl(gname, {**prompt, "max_new_tokens": 40}, stream=True)})
    if a.kind == "vim":
        pname, ename = name + "_preprocess", name + "_image"
        pdir = os.path.join(root, pname)
        os.makedirs(os.path.join(pdir, "1"))
        _copy(os.path.join(_MODELS_DIR, "image_preprocess.py"), os.path.join(pdir, "1", "model.py"))
        _copy(_PICTURE, os.path.join(pdir, "1", "mq_picture.py"))      # the transform of `run`, verbatim
        pc = preprocess_config(a, pname, cfg)
        with open(os.path.join(pdir, "config.pbtxt"), "w") as f:
            f.write(dumps(pc))
        edir = os.path.join(root, ename)
        os.makedirs(os.path.join(edir, "1"))
        ec = ensemble_config(a, ename, pname, name, c["max_batch_size"], cfg)
        etext = dumps(ec)
        with open(os.path.join(edir, "config.pbtxt"), "w") as f:
            f.write(etext)
        with open(os.path.join(edir, "README.md"), "w") as f:
            f.write(_model_readme(ename, "ensemble", f"encoded PNG/JPEG bytes -> {pname} (decode, the eval transform "
                                  f"of `mq-deploy run` for {a.config['img_size']} px, normalise) -> {name}", etext,
                                  _example_image(ename), ["The preprocessing model needs numpy and Pillow in the "
                                                          "server's Python (`mq-deploy serve --setup`)."]))
        summary.append({"name": pname, "backend": "python", "what": "PNG/JPEG bytes -> normalised tensor",
                        "config": pc, "curl": None})
        summary.append({"name": ename, "backend": "ensemble", "what": f"{pname} -> {name}", "config": ec,
                        "curl": None})


def write_repository(artifacts, out: str, cfg: TritonConfig | None = None) -> dict:
    """Write the Triton model repository `out` (refused if it exists, unless cfg.overwrite and it is one we
    wrote). Returns {"path", "models": [{"name", "backend", "what", "config"}]}."""
    from mq_deploy.fileio import atomic_dir

    cfg = cfg or TritonConfig()
    planned = plan(list(artifacts), cfg)
    data = [os.path.join(os.path.dirname(os.path.abspath(a.onnx)), f) for a, _, _ in planned for f in a.data_files]
    inputs = [a.path for a, _, _ in planned] + [a.onnx for a, _, _ in planned] + data + \
             [a.engine for a, _, _ in planned if a.engine] + [p for p in (cfg.custom_op_lib, cfg.labels) if p]
    summary: list = []
    plugins = sorted({p for a, _, _ in planned for p in a.plugins})
    repo_name = os.path.basename(os.path.abspath(out))
    _refuse_unwritable("the repository name", repo_name, ":", " (docker's -v splits on ':')")
    for p in plugins:
        _refuse_unwritable("the plugin path", p, ":", " (docker's -v splits on ':')")
    with atomic_dir(out, overwrite=cfg.overwrite, inputs=inputs, what="model repository", kind=REPO_KIND) as tmp:
        for a, name, backend in planned:
            _write_model(tmp, a, name, backend, cfg, summary)
        from mq_deploy.serve.server import python_model_imports

        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_root_readme(summary, repo_name, plugins, cfg.custom_op_lib, python_model_imports(tmp)))
    return {"path": os.path.abspath(out), "models": summary}
