"""The ONNX Runtime session of mq-deploy's Triton Python-backend models (ort_model.py, ort_step_model.py),
with OrtRunner's session options. `mq-deploy triton` copies this file beside each model.py."""

import os

import triton_python_backend_utils as pb_utils


def parameters(model_config):
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def make_session(model_dir, params, model_name):
    try:
        import onnxruntime as ort
    except ImportError:
        raise pb_utils.TritonModelException(
            f"{model_name}: the server's Python cannot import onnxruntime; install it for the interpreter the "
            "Python backend embeds (Debian: /usr/bin/python3.11 -m pip install --break-system-packages "
            "onnxruntime; NVIDIA's container: pip install onnxruntime)") from None
    so = ort.SessionOptions()
    threads = int(params.get("intra_op_threads", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
    # as OrtRunner: no busy-waiting of the intra-op pool between runs (it starves other instances), and
    # the exact int8 GEMM on CPUs without VNNI (mq_deploy.backends.ort.runner.EXACT_INT8_CONFIG)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.x64quantprecision", "1")
    lib = params.get("custom_op_library")
    if lib:
        so.register_custom_ops_library(os.path.join(model_dir, lib))
    return ort.InferenceSession(os.path.join(model_dir, params["onnx_file"]), so, providers=["CPUExecutionProvider"])
