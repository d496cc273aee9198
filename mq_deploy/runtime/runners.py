"""Runners with one interface, `infer(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]`.

- TorchRunner: our PyTorch model (FP, or fake-quantized when loaded from a quantized checkpoint).
- OrtRunner: an exported ONNX file in ONNX Runtime (the mq::SelectiveScan function bodies, or the
  native custom-op library when one is registered).
- TensorRTRunner (mq_deploy.build.tensorrt): a serialized engine, where TensorRT is importable.

`open_runner(path)` picks by file type. Feeds are checked against the model's inputs (names,
dtypes, ranks, fixed dimensions) so a wrong feed is a one-line error, not a runtime trace.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from mq_deploy.errors import MQUserError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
ORT_LIB_ENV = "MQ_SCAN_ORT_LIB"      # the native mq::SelectiveScan custom-op library, used when set


class TorchRunner:
    """PyTorch reference. Feeds: input_ids (LM; with conv_state / ssm_state for the step form) or images."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.model = loaded.model.eval()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict:
        import torch

        with torch.no_grad():
            if "images" in feeds:
                return {"logits": self.model(torch.from_numpy(np.asarray(feeds["images"], np.float32))).numpy()}
            ids = torch.from_numpy(np.asarray(feeds["input_ids"], np.int64))
            if "conv_state" not in feeds:
                return {"logits": self.model(ids).numpy()}
            cs, ss = torch.from_numpy(feeds["conv_state"]), torch.from_numpy(feeds["ssm_state"])
            logits, states = self.model(ids, return_state=True, state=list(zip(cs, ss)))
            return {"logits": logits.numpy(), "conv_state_out": torch.stack([c for c, _ in states]).numpy(),
                    "ssm_state_out": torch.stack([s for _, s in states]).numpy()}


def load_onnx(path: str, load_external_data: bool = True):
    """onnx.load with a clear error for a missing, truncated or corrupt file."""
    import onnx

    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except Exception as e:  # DecodeError, ValidationError, OSError on missing external data
        raise MQUserError(f"{path}: not a readable ONNX model (truncated or corrupt?): {str(e).splitlines()[0]}") \
            from None
    if not model.graph.node:
        raise MQUserError(f"{path}: not a readable ONNX model (no graph nodes; truncated or corrupt?)")
    return model


def metadata(model) -> dict:
    meta = {p.key: p.value for p in model.metadata_props}
    if "mq.config" in meta:
        meta["mq.config"] = json.loads(meta["mq.config"])
    if meta.get("mq.quant"):
        meta["mq.quant"] = json.loads(meta["mq.quant"])
    return meta


def missing_functions(model) -> list:
    """Custom-domain ops used by the graph that have no function body in the model."""
    have = {(f.domain, f.name) for f in model.functions}
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                   if n.domain not in ("", "ai.onnx", "com.microsoft") and (n.domain, n.op_type) not in have})


_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(double)": np.float64, "tensor(bool)": np.bool_}


class OrtRunner:
    """An ONNX file in ONNX Runtime (CPU). custom_op_library: a native mq::SelectiveScan library."""

    def __init__(self, path: str, custom_op_library: str | None = None, threads: int | None = None,
                 optimized_model_path: str | None = None, optimize: bool = True, spin: bool = False):
        import onnxruntime as ort

        self.path = path
        custom_op_library = custom_op_library or os.environ.get(ORT_LIB_ENV) or None
        self.custom_op_library = custom_op_library
        self.proto = load_onnx(path, load_external_data=False)
        self.meta = metadata(self.proto)
        missing = missing_functions(self.proto)
        if missing and not custom_op_library:
            raise MQUserError(f"{path}: the graph uses {', '.join(missing)} with no function body in the file, and "
                              "no plugin library was given; re-export it with `mq-deploy export` (which embeds the "
                              "bodies) or pass --custom-op-lib PATH of the native mq::SelectiveScan library")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        if not spin:
            # ORT's pool busy-waits after each run by default, which starves the PyTorch reference that
            # verify runs in between (2 cores: 10x slower). Benchmarks pass spin=True.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if optimized_model_path:
            so.optimized_model_filepath = optimized_model_path
        if custom_op_library:
            if not os.path.isfile(custom_op_library):
                raise MQUserError(f"{custom_op_library}: no such custom-op library (build it with "
                                  "plugins/selective_scan/ort/build.sh, see its README)")
            so.register_custom_ops_library(custom_op_library)
        try:
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MQUserError(f"{path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict:
        unknown = sorted(set(feeds) - set(self.inputs))
        missing = sorted(set(self.inputs) - set(feeds))
        if unknown or missing:
            raise MQUserError(f"{self.path}: inputs are {', '.join(sorted(self.inputs))}; "
                              + (f"missing {', '.join(missing)}" if missing else "")
                              + ("; " if missing and unknown else "")
                              + (f"unknown {', '.join(unknown)}" if unknown else ""))
        out = {}
        for name, value in feeds.items():
            spec = self.inputs[name]
            want = _NP_OF_ORT.get(spec.type)
            arr = np.asarray(value)
            if want is not None and arr.dtype != want:
                raise MQUserError(f"{self.path}: input {name} must be {np.dtype(want).name}, got {arr.dtype.name}")
            if arr.ndim != len(spec.shape):
                raise MQUserError(f"{self.path}: input {name} must have rank {len(spec.shape)} "
                                  f"{list(spec.shape)}, got shape {list(arr.shape)}")
            for dim, (got, exp) in enumerate(zip(arr.shape, spec.shape)):
                if isinstance(exp, int) and got != exp:
                    raise MQUserError(f"{self.path}: input {name} dimension {dim} must be {exp} "
                                      f"({list(spec.shape)}), got shape {list(arr.shape)}")
            out[name] = np.ascontiguousarray(arr)
        return out

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict:
        outs = self.session.run(self.output_names, self.check_feeds(feeds))
        return dict(zip(self.output_names, outs))


def open_runner(path: str, custom_op_library: str | None = None, plugins=(), threads: int | None = None):
    """OrtRunner for .onnx, TensorRTRunner for an engine file."""
    if path.endswith(ENGINE_SUFFIXES):
        from mq_deploy.build.tensorrt import TensorRTRunner

        if not os.path.isfile(path):
            raise MQUserError(f"{path}: no such file")
        return TensorRTRunner(path, plugins=plugins)
    return OrtRunner(path, custom_op_library=custom_op_library, threads=threads)
