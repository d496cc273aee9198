"""`mq-deploy build --backend onnxruntime`: an ORT-optimized model, verified against its input ONNX.

ONNX Runtime applies its graph optimizations (QDQ fusion into MatMulIntegerToFloat / QLinear ops,
constant folding, function inlining) once and saves the result, so a server loads it without
re-optimizing. The level is "extended", not "all": "all" adds layout transforms tied to this CPU's
instruction set, and the artifact should run on any x86-64 / ARM machine. With a custom-op library
the mq::SelectiveScan nodes stay native nodes (their bodies are not inlined), and the saved model
then needs that library wherever it runs.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from mq_deploy.errors import MQUserError


def sample_feeds(runner, shapes: dict | None = None, seed: int = 0) -> dict:
    """Feeds for every input of an mq-deploy graph: shapes from `shapes` (name -> tuple) or defaults."""
    rng = np.random.default_rng(seed)
    meta = runner.meta
    cfg = meta.get("mq.config") or {}
    feeds = {}
    batch = 2
    for name, spec in runner.inputs.items():
        shape = shapes.get(name) if shapes else None
        if shape is None:
            shape = []
            for d in spec.shape:
                if isinstance(d, int):
                    shape.append(d)
                elif d == "batch":
                    shape.append(batch)
                else:
                    shape.append(64)
        shape = tuple(int(s) for s in shape)
        if name == "input_ids":
            feeds[name] = rng.integers(0, cfg.get("vocab_size", 2), shape).astype(np.int64)
        elif name.endswith("_state"):
            feeds[name] = np.zeros(shape, np.float32)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
        batch = shape[0] if name in ("input_ids", "images") else batch
    return feeds


def build_ort(onnx_path: str, out_path: str, *, custom_op_library: str | None = None, shapes: dict | None = None,
              overwrite: bool = False, min_cosine: float = 0.999, min_top1_agreement: float = 0.99) -> dict:
    """Write the ORT-optimized model atomically and compare it with the input on sample feeds."""
    import onnxruntime as ort

    from mq_deploy.export.exporter import _check_output_path
    from mq_deploy.runtime.runners import OrtRunner
    from mq_deploy.verify.verify import compare_outputs

    src = OrtRunner(onnx_path, custom_op_library=custom_op_library)
    out_abs = _check_output_path(onnx_path, out_path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=os.path.dirname(out_abs))
    os.close(fd)
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = tmp
        if src.custom_op_library:
            so.register_custom_ops_library(src.custom_op_library)
        t0 = time.perf_counter()
        try:
            ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MQUserError(f"{onnx_path}: ONNX Runtime cannot optimize it: {str(e).splitlines()[0]}") from None
        seconds = time.perf_counter() - t0
        built = OrtRunner(tmp, custom_op_library=src.custom_op_library)
        feeds = sample_feeds(src, shapes)
        want, got = src.infer(feeds), built.infer(feeds)
        outputs = {k: compare_outputs(got[k], want[k], classes=k == "logits") for k in want}
        lg = outputs.get("logits", {})
        passed = lg.get("cosine_mean", 1.0) >= min_cosine and lg.get("top1_agreement", 1.0) >= min_top1_agreement
        if not passed:
            raise MQUserError(f"the optimized model disagrees with {onnx_path} (logits cosine "
                              f"{lg.get('cosine_mean'):.6f}, top-1 agreement {lg.get('top1_agreement'):.4f}); "
                              "nothing was written")
        ops: dict = {}
        for n in built.proto.graph.node:
            key = f"{n.domain}::{n.op_type}" if n.domain and n.domain != "ai.onnx" else n.op_type
            ops[key] = ops.get(key, 0) + 1
        os.replace(tmp, out_abs)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"backend": "onnxruntime", "onnxruntime_version": ort.__version__, "input": os.path.abspath(onnx_path),
            "output": out_abs, "bytes": os.path.getsize(out_abs), "build_seconds": seconds,
            "nodes_before": len(src.proto.graph.node), "nodes_after": sum(ops.values()), "op_counts": ops,
            "custom_op_library": src.custom_op_library,
            "verify": {"feeds": {k: list(v.shape) for k, v in feeds.items()}, "outputs": outputs, "passed": passed}}
