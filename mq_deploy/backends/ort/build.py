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
import time

import numpy as np

from mq_deploy.errors import MQUserError


def sample_feeds(runner, shapes: dict | None = None, seed: int = 0) -> dict:
    """Feeds for every input of an mq-deploy graph open in `runner` (see backends.feeds)."""
    from mq_deploy.backends.feeds import sample_feeds as feeds

    return feeds(runner.input_specs, runner.artifact, shapes, seed, what=runner.path)


def build_ort(onnx_path: str, out_path: str, *, custom_op_library: str | None = None, shapes: dict | None = None,
              overwrite: bool = False, min_cosine: float = 0.999, min_top1_agreement: float = 0.99) -> dict:
    """Write the ORT-optimized model atomically and compare it with the input on sample feeds; nothing
    is written unless they agree."""
    import onnxruntime as ort

    from mq_deploy import fileio
    from mq_deploy.backends.ort.runner import OrtRunner, session_options
    from mq_deploy.export.surgery import op_counts
    from mq_deploy.verify.compare import compare_outputs

    inputs = [onnx_path, onnx_path + ".data"] + ([custom_op_library] if custom_op_library else [])
    out_abs = fileio.check_target(out_path, overwrite, inputs, "optimized model")
    src = OrtRunner(onnx_path, custom_op_library=custom_op_library)
    feeds = sample_feeds(src, shapes)
    want = src.infer(feeds)
    bad = [k for k, v in want.items() if not np.isfinite(v).all()]
    if bad:
        raise MQUserError(f"{onnx_path} itself gives non-finite {', '.join(bad)} on random sample feeds "
                          f"{ {k: list(v.shape) for k, v in feeds.items()} }; the build cannot be verified "
                          "(are the weights finite and sensible?)")
    with fileio.atomic_path(out_abs, overwrite=overwrite, inputs=inputs, what="optimized model") as tmp:
        so = session_options(level="extended", optimized_model_path=tmp, custom_op_library=src.custom_op_library)
        t0 = time.perf_counter()
        try:
            ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MQUserError(f"{onnx_path}: ONNX Runtime cannot optimize it: {str(e).splitlines()[0]}") from None
        seconds = time.perf_counter() - t0
        built = OrtRunner(tmp, custom_op_library=src.custom_op_library)
        got = built.infer(feeds)
        outputs = {k: compare_outputs(got[k], want[k], classes=k == "logits") for k in want}
        failed = []
        for k, o in outputs.items():
            if not np.isfinite(got[k]).all():
                failed.append(f"{k} has non-finite values")
            elif k == "logits" and (o["cosine_mean"] < min_cosine or o.get("top1_agreement", 1.0) < min_top1_agreement):
                failed.append(f"{k} cosine {o['cosine_mean']:.6f} (need >= {min_cosine}), top-1 agreement "
                              f"{o.get('top1_agreement', 1.0):.4f} (need >= {min_top1_agreement})")
        if failed:
            raise MQUserError(f"the optimized model disagrees with {onnx_path}: {'; '.join(failed)}; "
                              "nothing was written")
        ops = op_counts(built.proto)
        del built
    return {"backend": "onnxruntime", "onnxruntime_version": ort.__version__, "input": os.path.abspath(onnx_path),
            "output": out_abs, "bytes": os.path.getsize(out_abs), "build_seconds": seconds,
            "nodes_before": len(src.proto.graph.node), "nodes_after": sum(ops.values()), "op_counts": ops,
            "custom_op_library": src.custom_op_library,
            "verify": {"feeds": {k: list(v.shape) for k, v in feeds.items()}, "outputs": outputs, "passed": True}}


def build_onnxruntime(onnx_path: str, out_path: str, *, int8: bool = False, fp16: bool = False, plugins=(),
                      min_shapes=None, opt_shapes=None, max_shapes=None, overwrite: bool = False) -> dict:
    """`mq-deploy build --backend onnxruntime`: trtexec-style flags checked, then build_ort."""
    from mq_deploy.backends.trt.build import check_int8, parse_shapes

    if fp16:
        raise MQUserError("--fp16 is a TensorRT option; the ONNX Runtime CPU build keeps float32 outside int8")
    if min_shapes or max_shapes:
        raise MQUserError("--minShapes/--maxShapes are TensorRT profile options; the ONNX Runtime build takes any "
                          "shape and verifies with --optShapes")
    if len(plugins or ()) > 1:
        raise MQUserError("the ONNX Runtime build takes one custom-op library (--plugins libmq_scan_ort.so)")
    check_int8(onnx_path, int8)
    return build_ort(onnx_path, out_path, custom_op_library=(plugins or [None])[0],
                     shapes=parse_shapes(opt_shapes) or None, overwrite=overwrite)
