"""`mq-deploy export`: a model or quantized checkpoint directory -> a checked ONNX file, written atomically."""

from __future__ import annotations

import os
import tempfile

from mq_deploy.errors import MQUserError
from mq_deploy.export.graph import OPSET, QuantSpec, build_model

# protobuf's 2 GiB limit: larger models keep their initializers in a side file
_EXTERNAL_DATA_BYTES = 1_800_000_000


def quant_spec(loaded) -> QuantSpec | None:
    """The QuantSpec of a quantized checkpoint (None for a float model)."""
    from mq_deploy.models.loaders import read_safetensors

    quant = (loaded.extra or {}).get("quant")
    if quant is None:
        return None
    if quant.get("act_granularity") != "per_tensor":
        raise MQUserError(f"{loaded.path}: activations are quantized {quant.get('act_granularity')}; export needs "
                          "static per-tensor scales (quantize with --act-granularity per_tensor)")
    flat = read_safetensors(os.path.join(loaded.path, "scales.safetensors"))
    return QuantSpec(wbits=quant["wbits"], abits=quant["abits"], recipe=quant.get("recipe", ""),
                     act_scales={k[4:]: float(v.reshape(-1)[0]) for k, v in flat.items() if k.startswith("act/")},
                     weight_scales={k[7:]: v for k, v in flat.items() if k.startswith("weight/")})


def supported_opsets():
    import onnx.defs

    return range(21, onnx.defs.onnx_opset_version() + 1)


def _check_output_path(model_path: str, out: str, overwrite: bool) -> str:
    out_abs = os.path.realpath(out)
    src = os.path.realpath(model_path)
    if out_abs == src or (os.path.isdir(src) and os.path.dirname(out_abs) == src and os.path.exists(out_abs)
                          and not out_abs.endswith(".onnx")):
        raise MQUserError(f"{out}: that is the input model; export never overwrites its input")
    if os.path.isdir(out_abs):
        raise MQUserError(f"{out}: is a directory; give the path of the .onnx file to write")
    if os.path.exists(out_abs) and not overwrite:
        raise MQUserError(f"{out}: already exists (pass --overwrite to replace it)")
    if not os.path.isdir(os.path.dirname(out_abs)):
        raise MQUserError(f"{out}: directory {os.path.dirname(out_abs)} does not exist")
    return out_abs


def save_model_atomic(proto, out_abs: str, check: bool = True) -> None:
    """Check the model and write it next to its destination, then rename it into place."""
    import onnx

    directory = os.path.dirname(out_abs)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=directory)
    os.close(fd)
    data_name = os.path.basename(out_abs) + ".data"
    external = proto.ByteSize() > _EXTERNAL_DATA_BYTES
    try:
        if external:
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name + ".tmp")
        else:
            onnx.save_model(proto, tmp)
        if check:
            onnx.checker.check_model(tmp, full_check=True)
        if external:
            os.replace(os.path.join(directory, data_name + ".tmp"), os.path.join(directory, data_name))
            # point the saved model at the final side-file name
            m = onnx.load(tmp, load_external_data=False)
            for t in m.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            onnx.save_model(m, tmp)
        os.replace(tmp, out_abs)
    finally:
        for p in (tmp, os.path.join(directory, data_name + ".tmp")):
            if os.path.exists(p):
                os.remove(p)


def export(model_path: str, out: str, step: bool = False, opset: int = OPSET, overwrite: bool = False) -> dict:
    """Export a model directory / checkpoint (FP or quantized) to ONNX; return a summary dict."""
    from mq_deploy.models.loaders import load_model

    if opset not in supported_opsets():
        raise MQUserError(f"--opset {opset} is not supported: QDQ int4 and the scan body need opset >= 21, and "
                          f"this onnx package knows up to {supported_opsets()[-1]}")
    out_abs = _check_output_path(model_path, out, overwrite)
    loaded = load_model(model_path)
    spec = quant_spec(loaded)
    proto = build_model(loaded.model, spec, step=step, opset=opset)
    save_model_atomic(proto, out_abs)
    counts: dict = {}
    for n in proto.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return {"path": out_abs, "nodes": len(proto.graph.node), "op_counts": counts, "bytes": os.path.getsize(out_abs),
            "quant": None if spec is None else f"{spec.recipe} W{spec.wbits}A{spec.abits}",
            "graph": "step" if step else "full", "architecture": loaded.architecture}
