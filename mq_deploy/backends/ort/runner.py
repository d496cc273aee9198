"""An ONNX file in ONNX Runtime (CPU): the mq::SelectiveScan function bodies, or the native custom-op
library when one is registered (`custom_op_library`, or $MQ_SCAN_ORT_LIB)."""

from __future__ import annotations

import os

import numpy as np

from mq_deploy.backends.base import Runner, TensorSpec
from mq_deploy.errors import MQUserError
from mq_deploy.export.onnx_file import load_onnx, metadata, missing_functions

ORT_LIB_ENV = "MQ_SCAN_ORT_LIB"      # the native mq::SelectiveScan custom-op library, used when set

_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(double)": np.float64, "tensor(bool)": np.bool_}


def session_options(threads: int | None = None, *, spin: bool = False, optimize: bool = True,
                    custom_op_library: str | None = None, optimized_model_path: str | None = None,
                    level: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise MQUserError(f"--threads must be a positive integer, got {threads!r}")
        so.intra_op_num_threads = threads
    if not spin:
        # ORT's pool busy-waits after each run by default, which starves the PyTorch reference that
        # verify runs in between (2 cores: 10x slower). Benchmarks pass spin=True.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


class OrtRunner(Runner):
    """An ONNX file in ONNX Runtime (CPU). custom_op_library: a native mq::SelectiveScan library."""

    def __init__(self, path: str, custom_op_library: str | None = None, threads: int | None = None,
                 optimized_model_path: str | None = None, optimize: bool = True, spin: bool = False):
        import onnxruntime as ort

        self.path = self.name = path
        custom_op_library = custom_op_library or os.environ.get(ORT_LIB_ENV) or None
        self.custom_op_library = custom_op_library
        self.proto = load_onnx(path, load_external_data=False)
        self.meta = metadata(self.proto)
        missing = missing_functions(self.proto)
        if missing and not custom_op_library:
            raise MQUserError(f"{path}: the graph uses {', '.join(missing)} with no function body in the file, and "
                              "no plugin library was given; re-export it with `mq-deploy export` (which embeds the "
                              "bodies) or pass --custom-op-lib PATH of the native mq::SelectiveScan library")
        so = session_options(threads, spin=spin, optimize=optimize, custom_op_library=custom_op_library,
                             optimized_model_path=optimized_model_path)
        try:
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MQUserError(f"{path}: ONNX Runtime cannot load it: {(str(e).splitlines() or [''])[0]}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_specs = {i.name: TensorSpec(i.name, _NP_OF_ORT.get(i.type), tuple(i.shape))
                            for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: dict) -> dict:
        try:
            outs = self.session.run(self.output_names, feeds)
        except Exception as e:   # a shape the graph cannot take (e.g. seq 0), out of memory
            raise MQUserError(f"{self.path}: ONNX Runtime failed on inputs "
                              f"{ {k: list(v.shape) for k, v in feeds.items()} }: "
                              f"{(str(e).splitlines() or [''])[0][:300]}") from None
        return dict(zip(self.output_names, outs))
