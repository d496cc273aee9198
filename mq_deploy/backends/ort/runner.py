"""An ONNX file in ONNX Runtime (CPU): the native custom-op library (mq::SelectiveScan and
mq::SelectiveScanFloat) when it is there (`custom_op_library`, $MQ_SCAN_ORT_LIB, else the one `pip install`
built into mq_deploy/_native/), or the ops' function bodies (custom_op_library=False: --no-native)."""

from __future__ import annotations

import os

import numpy as np

from mq_deploy.backends.base import Runner, TensorSpec, check_io, parse_metadata
from mq_deploy.errors import MQUserError
from mq_deploy.export.onnx_file import load_onnx, metadata, missing_functions

# ONNX Runtime logs its own (coloured) line for an error before raising it; we turn every such exception
# into one line of ours, so its log shows fatal messages only (4 = ORT_LOGGING_LEVEL_FATAL)
ORT_LOG_SEVERITY = 4

ORT_LIB_ENV = "MQ_SCAN_ORT_LIB"      # the native mq::SelectiveScan custom-op library, used when set

_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(double)": np.float64, "tensor(bool)": np.bool_}


# ONNX Runtime fuses Q -> DQ -> MatMul <- DQ(int8 weight) into an int8 GEMM. On x86 CPUs without VNNI
# (AVX2 only: AMD Zen 2/3, older Intel) its u8 x s8 kernel sums pairs of products in int16 (vpmaddubsw) and
# saturates: measured here (AMD EPYC, AVX2) the W8A8 sample LM's logits were off by up to 0.4 (cosine
# 0.998 against the fake-quantized model) while the unfused graph is exact. This session option makes ORT
# convert the weights to u8 and use its u8 x u8 kernel on those CPUs (23.9 vs 21.5 ms on a 256 x 512 x
# 1024 QDQ MatMul here, float 34.9 ms); on VNNI CPUs it changes nothing. ORT's conversion needs the
# per-axis weight zero points written explicitly, which export does (export/graph.py _Graph.weight).
EXACT_INT8_CONFIG = {"session.x64quantprecision": "1"}


def exact_int8(so, implicit_zero_points: bool = False):
    """Set EXACT_INT8_CONFIG on ORT SessionOptions `so` (every session mq-deploy makes). A file exported before
    the explicit zero points (implicit_zero_points) cannot take that conversion: its int8 MatMuls are left
    unfused instead (session.disable_quant_qdq: the weights dequantized to float, exact on every CPU, slower)."""
    if implicit_zero_points:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        return so
    for k, v in EXACT_INT8_CONFIG.items():
        so.add_session_config_entry(k, v)
    return so


def has_implicit_axis_zero_points(proto) -> bool:
    """A per-axis int8 DequantizeLinear of an initializer without its zero point (files exported before
    mq-deploy wrote them explicitly)."""
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 2 and node.input[0] in inits \
                and inits[node.input[0]].data_type == 3 and any(a.name == "axis" for a in node.attribute):
            return True
    return any(n.op_type == "DequantizeLinear" and len(n.input) == 2 and any(a.name == "axis" for a in n.attribute)
               for f in proto.functions for n in f.node)


def session_options(threads: int | None = None, *, spin: bool = False, optimize: bool = True,
                    custom_op_library: str | None = None, optimized_model_path: str | None = None,
                    level: str | None = None, implicit_zero_points: bool = False, prepack: bool = True):
    import onnxruntime as ort

    from mq_deploy.backends.base import check_threads

    so = ort.SessionOptions()
    so.log_severity_level = ORT_LOG_SEVERITY
    exact_int8(so, implicit_zero_points)
    if threads is not None:
        so.intra_op_num_threads = check_threads(threads)
    if not spin:
        # ORT's pool busy-waits after each run by default, which starves the PyTorch reference that
        # verify runs in between (2 cores: 10x slower). Benchmarks pass spin=True.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:     # no packed copy of each weight beside the original (a build's sessions run once)
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif level == "extended":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    if custom_op_library:
        if not os.path.isfile(custom_op_library):
            raise MQUserError(f"{custom_op_library}: no such custom-op library (build it with "
                              "plugins/selective_scan/ort/build.sh, see its README)")
        try:
            so.register_custom_ops_library(custom_op_library)
        except Exception as e:
            raise MQUserError(f"{custom_op_library}: ONNX Runtime cannot load it as a custom-op library: "
                              f"{(str(e).splitlines() or [''])[0]}") from None
    return so


def default_library(custom_op_library=None):
    """The custom-op library to register: the one given, else $MQ_SCAN_ORT_LIB, else mq_deploy/_native's
    when it was built; False: none (the function bodies)."""
    if custom_op_library is False:
        return None
    if custom_op_library:
        return custom_op_library
    from mq_deploy.ops.native import ort_library  # torch-free

    return os.environ.get(ORT_LIB_ENV) or ort_library()


class OrtRunner(Runner):
    """An ONNX file in ONNX Runtime (CPU). custom_op_library: a native mq::SelectiveScan library (default:
    the built one, see default_library; False: none)."""

    def __init__(self, path: str, custom_op_library: str | None | bool = None, threads: int | None = None,
                 optimized_model_path: str | None = None, optimize: bool = True, spin: bool = False,
                 prepack: bool = True):
        import onnxruntime as ort

        self.path = self.name = path
        custom_op_library = default_library(custom_op_library)
        self.custom_op_library = custom_op_library
        proto = load_onnx(path, load_external_data=False)   # not kept: inline weights would stay resident
        try:
            meta = metadata(proto)
        except MQUserError as e:
            raise MQUserError(f"{path}: its ONNX metadata is invalid: {e}") from None
        self.artifact = parse_metadata(meta, path)
        if self.artifact.state_layout == "batch_first":
            raise MQUserError(f"{path}: a Triton repository's copy of a step graph (its states batch-first, for "
                              "Triton's batching: serve.batch_first); give the export it was written from")
        if self.artifact.config is not None:     # the validated config, for readers of meta["mq.config"]
            meta["mq.config"] = self.artifact.config.to_dict()
        self.meta = meta
        check_mq_nodes(proto, path, self.artifact.config)
        missing = missing_functions(proto)
        implicit_zp = has_implicit_axis_zero_points(proto)
        del proto
        if missing and not custom_op_library:
            need = self.artifact.custom_op_library
            if need:
                raise MQUserError(f"{path}: its {', '.join(missing)} nodes are native (no function body; it was "
                                  f"built with the custom-op library {need}); pass --custom-op-lib PATH of that "
                                  "library, or build it again without --plugins")
            raise MQUserError(f"{path}: the graph uses {', '.join(missing)} with no function body in the file, and "
                              "no plugin library was given; re-export it with `mq-deploy export` (which embeds the "
                              "bodies) or pass --custom-op-lib PATH of the native mq::SelectiveScan library")
        so = session_options(threads, spin=spin, optimize=optimize, custom_op_library=custom_op_library,
                             optimized_model_path=optimized_model_path, implicit_zero_points=implicit_zp,
                             prepack=prepack)
        try:
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MQUserError(f"{path}: ONNX Runtime cannot load it: {(str(e).splitlines() or [''])[0]}") from None
        self.input_specs = {i.name: TensorSpec(i.name, _NP_OF_ORT.get(i.type), tuple(i.shape))
                            for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        check_io(self.artifact, {k: v.shape for k, v in self.input_specs.items()},
                 {o.name: tuple(o.shape) for o in self.session.get_outputs()}, path)
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = ORT_LOG_SEVERITY

    @property
    def proto(self):
        """The ModelProto without external data, read again on each use (the runner keeps none resident)."""
        return load_onnx(self.path, load_external_data=False)

    def decoder(self, batch: int = 1):
        """Zero-copy decode on this step graph (OrtDecoder)."""
        return OrtDecoder(self, batch)

    def infer_impl(self, feeds: dict) -> dict:
        try:
            outs = self.session.run(self.output_names, feeds, self._run_options)
        except Exception as e:   # a shape the graph cannot take (e.g. seq 0), out of memory
            raise MQUserError(f"{self.path}: ONNX Runtime failed on inputs "
                              f"{ {k: list(v.shape) for k, v in feeds.items()} }: "
                              f"{(str(e).splitlines() or [''])[0][:300]}") from None
        return dict(zip(self.output_names, outs))


def check_mq_nodes(proto, path: str, config=None) -> None:
    """The attributes of the graph's mq:: nodes, as the native ops check them when they load (the function
    bodies would run a NaN or negative scale silently): *_scale finite and > 0, norm_eps finite and >= 0,
    out_dtype 1 (float) or 10 (float16), layer inside the stacked states; every scale the op's contract
    names present. Also the inline scales of QuantizeLinear / DequantizeLinear and of mq::QLinear /
    mq::DynamicQLinear (their scale inputs): finite and > 0."""
    import math

    from onnx import AttributeProto, numpy_helper

    from mq_deploy.export import qlinear_op, scan_op, ssd_op, state_update_op
    from mq_deploy.export import ssd_state_update_op as ssd_update

    required = {scan_op.OP: scan_op.SCALE_ATTRS, state_update_op.OP_UPDATE: state_update_op.SCALE_ATTRS + ("layer",),
                state_update_op.OP_UPDATE_FLOAT: ("layer",),
                state_update_op.OP_UPDATE_INT8_STATE: state_update_op.SCALE_ATTRS + ("layer",),
                ssd_op.OP: ssd_op.SCALE_ATTRS + ssd_op.SHAPE_ATTRS, ssd_op.OP_FLOAT: ssd_op.SHAPE_ATTRS,
                ssd_update.OP_UPDATE: ssd_update.UPDATE_SCALE_ATTRS + ssd_op.SHAPE_ATTRS + ("layer",),
                ssd_update.OP_UPDATE_FLOAT: ssd_op.SHAPE_ATTRS + ("layer",),
                ssd_update.OP_UPDATE_INT8_STATE: ssd_update.UPDATE_SCALE_ATTRS + ssd_op.SHAPE_ATTRS + ("layer",)}
    n_layer = getattr(config, "n_layer", None)
    # a fused step op reads its layer of the stacked states it takes as input 2 (conv_state): as many layers as
    # that graph input declares (a hybrid's SSM layers), else the config's
    inputs = {i.name: i for i in proto.graph.input}

    def stacked(node):
        si = inputs.get(node.input[2]) if len(node.input) > 2 else None
        dims = si.type.tensor_type.shape.dim if si is not None else ()
        return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else n_layer

    def bad(node, why):
        op = f"{node.domain}::{node.op_type}"
        what = f"node {node.name} ({op})" if node.name else f"a {op} node"
        raise MQUserError(f"{path}: {what} {why}; the file was edited or corrupted (export it again with "
                          "`mq-deploy export`)")

    for node in proto.graph.node:
        if node.domain != scan_op.DOMAIN:
            continue
        attrs = {a.name: a for a in node.attribute}
        layers = stacked(node)
        for name in required.get(node.op_type, ()):
            if name not in attrs:
                bad(node, f"has no attribute {name}")
        for name, a in attrs.items():
            if name.endswith("_scale") and a.type == AttributeProto.FLOATS:     # per channel (mq::SSDScan)
                vals = list(a.floats)
                if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
                    bad(node, f"attribute {name} must hold finite floats > 0, got "
                              f"{next((v for v in vals if not (math.isfinite(v) and v > 0)), 'none')}")
            elif name.endswith("_scale") or name in ("norm_eps", "dt_min"):
                v = a.f if a.type == AttributeProto.FLOAT else None
                ok = v is not None and math.isfinite(v) and (v > 0 if name.endswith("_scale") else v >= 0)
                if not ok:
                    bad(node, f"attribute {name} must be a finite float {'> 0' if name.endswith('_scale') else '>= 0'}"
                              f", got {v if v is not None else AttributeProto.AttributeType.Name(a.type)}")
            elif name == "dt_max" and not (a.type == AttributeProto.FLOAT and a.f > 0 and not math.isnan(a.f)):
                bad(node, f"attribute dt_max must be a float > 0 (inf: no limit), got {a.f}")
            elif name in ssd_op.SHAPE_ATTRS and not (a.type == AttributeProto.INT and 0 < a.i <= 1 << 20):
                bad(node, f"attribute {name} must be a positive integer, got {a.i}")
            elif name == "out_dtype" and not (a.type == AttributeProto.INT and a.i in (1, 10)):
                bad(node, f"attribute out_dtype must be 1 (float) or 10 (float16), got {a.i}")
            elif name == "layer" and not (a.type == AttributeProto.INT and a.i >= 0
                                          and (layers is None or a.i < layers)):
                bad(node, f"attribute layer {a.i} is outside the {layers or '?'} stacked layers")
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scales = node.input[1:2]
        elif node.domain == scan_op.DOMAIN and node.op_type in qlinear_op.SCALE_INPUTS:
            scales = [node.input[i] for i in qlinear_op.SCALE_INPUTS[node.op_type] if i < len(node.input)]
        else:
            continue
        for t in (inits[name] for name in scales if name in inits):
            if t.data_location == 1:          # external data is not read here
                continue
            scale = numpy_helper.to_array(t).astype(np.float64)
            if scale.size and not (np.isfinite(scale).all() and (scale > 0).all()):
                raise MQUserError(f"{path}: the scale {t.name} of a {node.op_type} node holds "
                                  f"{'non-finite' if not np.isfinite(scale).all() else 'zero or negative'} values; "
                                  "the file was edited or corrupted (export it again with `mq-deploy export`)")


def state_layout(runner) -> list:
    """[(input, output, dims)] of a step graph's states: which input each output carries on
    (mq_deploy.families.state_inputs of its metadata's config) and the input's dimensions as the graph declares
    them (None: the batch, or a cache's growing length), checked against each other."""
    from mq_deploy.families import state_inputs

    cfg = runner.artifact.config
    if cfg is None or runner.artifact.graph != "step":
        raise MQUserError(f"{runner.path}: not a decode-step graph (export it with --decode-step)")
    out = []
    for si in state_inputs(cfg):
        spec = runner.input_specs.get(si.name)
        if spec is None or si.output not in runner.output_names:
            raise MQUserError(f"{runner.path}: the step graph has no {si.name} input / {si.output} output its "
                              "metadata implies; export it again")
        dims = tuple(d if isinstance(d, int) and d > 0 else None for d in spec.shape)
        if len(dims) != len(si.dims) or any(w != g for w, g in zip(si.dims, dims) if isinstance(w, int)):
            raise MQUserError(f"{runner.path}: the step graph's {si.name} input is {list(spec.shape)}, its metadata "
                              f"implies {list(si.dims)}; export it again")
        out.append((si.name, si.output, tuple(None if isinstance(d, str) else d for d in si.dims)))
    return out


def empty_states(runner, batch: int) -> dict:
    """{input: zeros} of a step graph's states for a fresh sequence (families.zero_states: a cache's length 0,
    or the one unattended slot of a Triton repository's copy)."""
    from mq_deploy.families import zero_states

    state_layout(runner)            # the graph agrees with its metadata's layout
    slots = 1 if runner.artifact.kv_cache == "sentinel" else 0
    return zero_states(runner.artifact.config, batch, cache_slots=slots)


class OrtDecoder:
    """Decode steps of a step graph with the states bound as ORT values (IOBinding): the state outputs of
    step t are the state inputs of step t+1, never copied through numpy. A fixed-size state (an SSM's)
    uses two buffers, swapped; a growing one (a KV cache) is the buffer ORT allocated for the output.

        dec = runner.decoder(batch)
        logits = dec.prefill(ids)          # [batch, L] -> last-position logits [batch, V] (numpy)
        logits = dec.step(tokens)          # [batch] -> [batch, V]
    """

    def __init__(self, runner: OrtRunner, batch: int = 1):
        self.layout = state_layout(runner)
        self.runner, self.batch, self.sess = runner, batch, runner.session
        self.vocab = runner.artifact.config.vocab_size
        self._io = None

    def _fixed(self, dims) -> bool:
        return dims.count(None) == 1          # only the batch is free

    def _shape(self, dims):
        return [self.batch if d is None else d for d in dims]

    def prefill(self, ids) -> np.ndarray:
        import onnxruntime as ort

        ids = np.asarray(ids, np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise MQUserError(f"prefill ids must be [{self.batch}, L], got {list(ids.shape)}")
        res = self.runner.infer({"input_ids": ids, **empty_states(self.runner, self.batch)})
        self._arrays = [res[out] for _, out, _ in self.layout]                 # kept alive: bound below
        self._cur = {name: ort.OrtValue.ortvalue_from_numpy(a) for (name, _, _), a in zip(self.layout, self._arrays)}
        self._spare = {name: ort.OrtValue.ortvalue_from_shape_and_type(self._shape(dims), a.dtype)   # the state's dtype
                       for (name, _, dims), a in zip(self.layout, self._arrays) if self._fixed(dims)}
        self._tok = np.zeros((self.batch, 1), np.int64)
        self._logits = ort.OrtValue.ortvalue_from_shape_and_type((self.batch, 1, self.vocab), np.float32)
        io = self.sess.io_binding()
        io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self._tok))   # shares _tok's memory
        io.bind_ortvalue_output("logits", self._logits)
        self._io = io
        return res["logits"][:, -1]

    def step(self, tokens) -> np.ndarray:
        if self._io is None:
            raise MQUserError("OrtDecoder.step before prefill")
        self._tok[:, 0] = np.asarray(tokens, np.int64).reshape(self.batch)
        io = self._io
        io.clear_binding_outputs()
        io.bind_ortvalue_output("logits", self._logits)
        for name, out, dims in self.layout:
            io.bind_ortvalue_input(name, self._cur[name])
            if self._fixed(dims):
                io.bind_ortvalue_output(out, self._spare[name])
            else:
                io.bind_output(out, "cpu")            # a cache grows: ORT allocates its next buffer
        try:
            self.sess.run_with_iobinding(io, self.runner._run_options)
        except Exception as e:
            raise MQUserError(f"{self.runner.path}: ONNX Runtime failed on a decode step: "
                              f"{(str(e).splitlines() or [''])[0][:300]}") from None
        grown = iter(io.get_outputs()[1:])             # the outputs in binding order, after the logits
        for name, _, dims in self.layout:
            value = next(grown)
            if self._fixed(dims):
                self._cur[name], self._spare[name] = self._spare[name], self._cur[name]
            else:
                self._cur[name] = value
        return np.array(self._logits.numpy()[:, -1])   # a copy: the bound buffer is rewritten next step

    def states(self) -> dict:
        """The current states as numpy copies (for checks), by output name."""
        return {out: np.array(self._cur[name].numpy()) for name, out, _ in self.layout}
