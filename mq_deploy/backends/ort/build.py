"""`mq-deploy build --backend onnxruntime`: an ORT-optimized model, verified against its input ONNX.

ONNX Runtime applies its graph optimizations (QDQ fusion into MatMulIntegerToFloat / QLinear ops,
constant folding, function inlining) once and saves the result, so a server loads it without
re-optimizing. The level is "extended", not "all": "all" adds layout transforms tied to this CPU's
instruction set, and the artifact should run on any x86-64 / ARM machine.

By default no custom-op library is registered: ORT inlines the mq:: ops' function bodies and the saved
model runs in any ONNX Runtime (checked: it must hold no mq:: node). With `--plugins libmq_scan_ort.so`
the mq:: nodes stay native (their bodies are dropped), and the saved model then needs that library
wherever it runs: its name is recorded in the model's metadata (mq.custom_op_library, which OrtRunner
names when it is missing) and in the build report (requires_custom_op_library).

An input whose weights lie in an external-data file (every export past protobuf's 2 GB, and every streamed
export) gives an optimized model with its weights in `OUT.data` beside it: ORT writes them there itself
(session.optimized_model_external_initializers_*), since a 2.8b model serialized whole is past protobuf's
limit. Both files are written under temporary names, verified, and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from mq_deploy.errors import MQUserError
from mq_deploy.export.onnx_file import EXTERNAL_MIN_BYTES


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
    from mq_deploy.export.onnx_file import (
        has_external_data,
        load_onnx,
        missing_functions,
        repoint_external,
        write_model,
    )
    from mq_deploy.export.surgery import op_counts
    from mq_deploy.verify.compare import compare_outputs

    inputs = [onnx_path, onnx_path + ".data"] + ([custom_op_library] if custom_op_library else [])
    out_abs = fileio.check_target(out_path, overwrite, inputs, "optimized model")
    shell = load_onnx(onnx_path, load_external_data=False)
    data_target = out_abs + ".data" if has_external_data(shell) else None
    if data_target:
        fileio.check_target(data_target, overwrite, inputs, "external data file")
    if not custom_op_library:
        missing = missing_functions(shell)
        if missing:
            raise MQUserError(f"{onnx_path}: its {', '.join(missing)} nodes have no function body to inline; export it "
                              "again with `mq-deploy export`, or pass --plugins libmq_scan_ort.so (the optimized "
                              "model then needs that library wherever it runs)")
    # each session of the build runs once: no prepacked weight copies, and one session resident at a time
    # (at 2.8b two sessions with packed weights held 9 GiB)
    src = OrtRunner(onnx_path, custom_op_library=custom_op_library or False, prepack=False)
    feeds = sample_feeds(src, shapes)
    want = src.infer(feeds)
    library, nodes_before = src.custom_op_library, len(shell.graph.node)
    del src
    bad = [k for k, v in want.items() if not np.isfinite(v).all()]
    if bad:
        raise MQUserError(f"{onnx_path} itself gives non-finite {', '.join(bad)} on random sample feeds "
                          f"{ {k: list(v.shape) for k, v in feeds.items()} }; the build cannot be verified "
                          "(are the weights finite and sensible?)")
    del shell
    # ORT's external-data file, under a temporary name beside its target (removed unless renamed into place)
    side = fileio.tracked_temp(fileio.temp_path(data_target)) if data_target else contextlib.nullcontext()
    with fileio.atomic_path(out_abs, overwrite=overwrite, inputs=inputs, what="optimized model") as tmp, \
            side as tmp_data:
        so = session_options(level="extended", optimized_model_path=tmp, custom_op_library=library, prepack=False)
        if tmp_data:     # ORT writes the weights there (a name relative to the optimized model's folder)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        os.path.basename(tmp_data))
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                        str(EXTERNAL_MIN_BYTES))
        t0 = time.perf_counter()
        try:
            ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MQUserError(f"{onnx_path}: ONNX Runtime cannot optimize it: {str(e).splitlines()[0]}") from None
        seconds = time.perf_counter() - t0
        needs = os.path.basename(custom_op_library) if custom_op_library else None
        proto = load_onnx(tmp, load_external_data=False)
        native = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain == "mq"})
        if native and not needs:
            raise MQUserError(f"ONNX Runtime kept {', '.join(native)} nodes without a custom-op library; the optimized "
                              "model would not run anywhere; nothing was written")
        if needs:        # the file says which library it needs (OrtRunner names it when it is missing)
            proto.metadata_props.add(key="mq.custom_op_library", value=needs)
            os.remove(tmp)
            write_model(proto, tmp)     # (external entries stay entries: the side file is not read)
        built = OrtRunner(tmp, custom_op_library=library or False, prepack=False)
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
        if tmp_data and os.path.exists(tmp_data):   # verified: the model names its side file's final name, then
            repoint_external(proto, tmp, os.path.basename(data_target))            # both go into place
            fileio.commit_file(tmp_data, data_target, overwrite, data_target)
        else:
            data_target = None                       # (inline, or no tensor reached ORT's side-file size)
        del proto
    return {"backend": "onnxruntime", "onnxruntime_version": ort.__version__, "input": os.path.abspath(onnx_path),
            "output": out_abs, "external_data": data_target, "bytes": os.path.getsize(out_abs),
            "build_seconds": seconds,
            "nodes_before": nodes_before, "nodes_after": sum(ops.values()), "op_counts": ops,
            "custom_op_library": library, "requires_custom_op_library": needs,
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
