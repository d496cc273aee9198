"""The Runner protocol every backend implements (Polygraphy's BaseRunner, STYLE.md 13).

    runner.input_specs   {name: TensorSpec(name, dtype, shape)}; shape entries are ints (fixed) or
                         strings / None (dynamic: "batch", "seq", ...)
    runner.output_names  [name, ...]
    runner.infer(feeds)  -> {name: np.ndarray}; feeds are checked once, here, then infer_impl computes

`check_feeds` is the only place that validates names, dtypes, ranks and fixed dimensions, so a wrong
feed is one line naming the input for PyTorch, ONNX Runtime and TensorRT alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mq_deploy.errors import MQUserError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple          # ints for fixed dims, str/None for dynamic ones

    def describe(self) -> str:
        return f"{self.name} {np.dtype(self.dtype).name}[{', '.join(str(d) for d in self.shape)}]"


class Runner:
    """Base: subclasses set `name`, `input_specs`, `output_names` and implement `infer_impl`."""

    name = "runner"
    input_specs: dict
    output_names: list

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict:
        specs = self.input_specs
        unknown = sorted(set(feeds) - set(specs))
        missing = sorted(set(specs) - set(feeds))
        if unknown or missing:
            parts = [f"missing {', '.join(missing)}"] if missing else []
            parts += [f"unknown {', '.join(unknown)}"] if unknown else []
            raise MQUserError(f"{self.name}: inputs are {', '.join(sorted(specs))}; " + "; ".join(parts))
        out = {}
        for name, value in feeds.items():
            spec = specs[name]
            arr = np.asarray(value)
            if spec.dtype is not None and arr.dtype != np.dtype(spec.dtype):
                raise MQUserError(f"{self.name}: input {name} must be {np.dtype(spec.dtype).name}, "
                                  f"got {arr.dtype.name}")
            if arr.ndim != len(spec.shape):
                raise MQUserError(f"{self.name}: input {name} must have rank {len(spec.shape)} "
                                  f"{list(spec.shape)}, got shape {list(arr.shape)}")
            for dim, (got, want) in enumerate(zip(arr.shape, spec.shape)):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise MQUserError(f"{self.name}: input {name} dimension {dim} must be {want} "
                                      f"({list(spec.shape)}), got shape {list(arr.shape)}")
            out[name] = np.ascontiguousarray(arr)
        return out

    def infer(self, feeds: Mapping[str, np.ndarray], check_inputs: bool = True) -> dict:
        return self.infer_impl(self.check_feeds(feeds) if check_inputs else dict(feeds))

    def infer_impl(self, feeds: dict) -> dict:
        raise NotImplementedError


def open_runner(path: str, custom_op_library: str | None = None, plugins=(), threads: int | None = None) -> Runner:
    """OrtRunner for an ONNX file, TensorRTRunner for an engine (.engine / .plan / .trt)."""
    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    if path.endswith(ENGINE_SUFFIXES):
        from mq_deploy.backends.trt.runner import TensorRTRunner

        return TensorRTRunner(path, plugins=plugins)
    from mq_deploy.backends.ort.runner import OrtRunner

    return OrtRunner(path, custom_op_library=custom_op_library, threads=threads)
