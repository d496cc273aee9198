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

    def close(self) -> None:
        if getattr(self, "_runner", None) is not None and self._runner.is_active:
            self._runner.deactivate()
