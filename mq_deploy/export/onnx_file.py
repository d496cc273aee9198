"""Reading ONNX files we (or others) wrote: clear errors for missing, truncated or foreign files."""

from __future__ import annotations

import json
import os

from mq_deploy.errors import MQUserError


def load_onnx(path: str, load_external_data: bool = True):
    """onnx.load with a clear error for a missing, truncated or corrupt file."""
    import onnx

    if os.path.isdir(path):
        raise MQUserError(f"{path}: is a folder, not an ONNX file")
    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except Exception as e:  # DecodeError, ValidationError, OSError on missing external data
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MQUserError(f"{path}: not a readable ONNX model (truncated or corrupt?): {first}") from None
    if not model.graph.node:
        raise MQUserError(f"{path}: not a readable ONNX model (no graph nodes; truncated or corrupt?)")
    return model


def metadata(model) -> dict:
    """mq.* metadata with its JSON values decoded; {} keys for a file mq-deploy did not write."""
    meta = {p.key: p.value for p in model.metadata_props}
    for key in ("mq.config", "mq.quant"):
        if meta.get(key):
            try:
                meta[key] = json.loads(meta[key])
            except ValueError:
                raise MQUserError(f"ONNX metadata {key} is not valid JSON; was the file edited?") from None
    return meta


def is_mq_export(model) -> bool:
    return model.producer_name == "mq-deploy" and any(p.key == "mq.kind" for p in model.metadata_props)


def require_mq_export(model, path: str, what: str) -> dict:
    """The metadata of an mq-deploy export, or one line saying the file is foreign."""
    if not is_mq_export(model):
        producer = model.producer_name or "an unknown producer"
        raise MQUserError(f"{path}: was not exported by mq-deploy (producer {producer!r}, no mq.* metadata); "
                          f"{what} needs a file written by `mq-deploy export`")
    return metadata(model)


def missing_functions(model) -> list:
    """Custom-domain ops used by the graph that have no function body in the model."""
    have = {(f.domain, f.name) for f in model.functions}
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                   if n.domain not in ("", "ai.onnx", "com.microsoft") and (n.domain, n.op_type) not in have})


def graph_inputs(model) -> list:
    """[(name, elem_type, shape)] of the real inputs (initializers excluded); shape entries are ints
    for fixed dims and the dim_param string (or None) for dynamic ones."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out.append((vi.name, tt.elem_type, dims))
    return out
