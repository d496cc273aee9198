"""A serialized TensorRT engine behind the Runner protocol, on Polygraphy's TrtRunner (which owns the
CUDA buffers, shapes and streams). Plugins are loaded first (backends.trt.build.load_plugins)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mq_deploy.backends.base import Runner, TensorSpec
from mq_deploy.errors import MQUserError


class TensorRTRunner(Runner):
    """`infer({name: array}) -> {name: array}`, numpy in and out. plugins: the libraries the engine was
    built with (default as in build_engine; an engine without plugin layers needs none)."""

    def __init__(self, engine_path, *, plugins: Sequence[str | os.PathLike] = ()):
        from mq_deploy.backends.trt.build import import_tensorrt, load_plugins, polygraphy_error
        from mq_deploy.backends.trt.plugins import BUILD_PLUGIN_HINT, find_plugin_library

        self.path = self.name = os.fspath(engine_path)
        if not os.path.isfile(self.path):
            raise MQUserError(f"{self.path}: no such engine file")
        import_tensorrt()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.exception import PolygraphyException

        self.plugins = find_plugin_library(plugins)
        self.meta: dict = {}
        try:
            load_plugins(self.plugins)
            self._runner = TrtRunner(EngineFromBytes(BytesFromPath(self.path)))
            self._runner.activate()
        except PolygraphyException as e:
            hint = "" if self.plugins else f" If it has mq::SelectiveScan layers, load the plugin: {BUILD_PLUGIN_HINT}"
            raise polygraphy_error(e, f"TensorRT could not load {self.path} (built by another TensorRT version or "
                                      f"for another GPU?){hint}") from None
        self._error = polygraphy_error
        self.input_specs = {name: TensorSpec(name, np.dtype(dtype) if dtype is not None else None,
                                             tuple(d if isinstance(d, int) and d >= 0 else None for d in shape))
                            for name, (dtype, shape) in self._runner.get_input_metadata().items()}
        engine = self._runner.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.output_names = [n for n in names if n not in self.input_specs]

    def infer_impl(self, feeds: dict) -> dict:
        from polygraphy.exception import PolygraphyException

        try:
            out = self._runner.infer(feeds)
        except PolygraphyException as e:   # shape outside the profile, execution failure
            raise self._error(e, f"{self.path}: TensorRT inference failed") from None
        return {k: np.array(v) for k, v in out.items()}

    def decoder(self, batch: int = 1):
        """Decode on this step-graph engine with the states kept on the GPU (TrtDecoder)."""
        return TrtDecoder(self, batch)

    def close(self) -> None:
        if getattr(self, "_runner", None) is not None and self._runner.is_active:
            self._runner.deactivate()


class TrtDecoder:
    """Decode steps of a step-graph engine with the states in device memory: the state outputs of step t
    (in Polygraphy's output-allocator buffers, reused across calls) are copied device to device into one of
    two state buffers we own, which step t + 1 reads. Only the token ids go up and the logits come down.
    Same interface as backends.ort.runner.OrtDecoder:

        dec = runner.decoder(batch)
        logits = dec.prefill(ids)          # [batch, L] -> last-position logits [batch, V] (numpy)
        logits = dec.step(tokens)          # [batch] -> [batch, V]

    Not run here (no GPU, no TensorRT on this machine): written against Polygraphy's TrtRunner.infer
    (device arrays in, copy_outputs_to_host=False out) and polygraphy.cuda."""

    _STATES = ("conv_state", "ssm_state")

    def __init__(self, runner: TensorRTRunner, batch: int = 1):
        from polygraphy import cuda

        specs = runner.input_specs
        if any(k not in specs for k in self._STATES):
            raise MQUserError(f"{runner.path}: not a decode-step engine (no conv_state / ssm_state inputs)")
        extra = sorted(set(specs) - set(self._STATES) - {"input_ids"})
        if extra:       # a hybrid's KV caches (past_key_i, ...): served by Triton (build --kv-slot), not decoded here
            raise MQUserError(f"{runner.path}: a step engine with states beyond conv_state / ssm_state ({extra[0]}, "
                              "a hybrid's KV cache); decode it in Triton (`mq-deploy build --kv-slot`, then "
                              "`mq-deploy triton --backend tensorrt`) or run the ONNX export")
        self.shapes = {}
        for k in self._STATES:
            shape = specs[k].shape
            if len(shape) != 4 or any(d is None for i, d in enumerate(shape) if i != 1):
                raise MQUserError(f"{runner.path}: {k} has shape {shape}; a step engine has [n_layer, batch, d, n]")
            self.shapes[k] = (shape[0], batch, shape[2], shape[3])
        self.runner, self.batch, self._cuda = runner, batch, cuda
        self._bufs = [{k: cuda.DeviceArray(shape=s, dtype=np.float32) for k, s in self.shapes.items()}
                      for _ in range(2)]
        self._cur = 0
        self._started = False

    def _run(self, ids) -> np.ndarray:
        from polygraphy.exception import PolygraphyException

        cur, nxt = self._bufs[self._cur], self._bufs[1 - self._cur]
        try:
            out = self.runner._runner.infer({"input_ids": np.ascontiguousarray(ids, np.int64), **cur},
                                            copy_outputs_to_host=False)
            stream = self.runner._runner.stream
            for k in self._STATES:
                src = out[k + "_out"]
                self._cuda.wrapper().memcpy(nxt[k].ptr, src.ptr, nxt[k].nbytes, self._cuda.MemcpyKind.DeviceToDevice,
                                            stream.ptr)
            logits = out["logits"]
            host = np.empty(logits.shape, dtype=np.float32)
            logits.copy_to(host, stream=stream)
            stream.synchronize()
        except PolygraphyException as e:
            raise self.runner._error(e, f"{self.runner.path}: TensorRT failed on a decode step") from None
        self._cur = 1 - self._cur
        return host[:, -1]

    def prefill(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise MQUserError(f"prefill ids must be [{self.batch}, L], got {list(ids.shape)}")
        for k, s in self.shapes.items():        # a fresh sequence: zero states, uploaded once
            self._bufs[self._cur][k].copy_from(np.zeros(s, np.float32))
        self._started = True
        return self._run(ids)

    def step(self, tokens) -> np.ndarray:
        if not self._started:
            raise MQUserError("TrtDecoder.step before prefill")
        return self._run(np.asarray(tokens, np.int64).reshape(self.batch, 1))
