"""`mq-deploy export`: a model or quantized checkpoint directory -> a checked ONNX file, written atomically."""

from __future__ import annotations

import contextlib
import os

from mq_deploy.errors import MQUserError
from mq_deploy.export.graph import INT4_FORMATS, OPSET, QuantSpec, build_model

# protobuf's 2 GiB limit: larger models keep their initializers in a side file
_EXTERNAL_DATA_BYTES = 1_800_000_000


def quant_spec(loaded) -> QuantSpec | None:
    """The QuantSpec of a quantized checkpoint (None for a float model)."""
    from mq_deploy.quant.qcheckpoint import EXPORT_ABITS, EXPORT_WBITS, QuantizedCheckpoint

    if not QuantizedCheckpoint.is_quantized(loaded):
        return None
    ckpt = QuantizedCheckpoint.read(loaded)
    if ckpt.act_granularity != "per_tensor":
        raise MQUserError(f"{loaded.path}: activations are quantized {ckpt.act_granularity}; export needs "
                          "static per-tensor scales (quantize with --act-granularity per_tensor)")
    if ckpt.wbits not in EXPORT_WBITS or ckpt.abits not in EXPORT_ABITS:
        raise MQUserError(f"{loaded.path}: W{ckpt.wbits}A{ckpt.abits} cannot be exported; the artifact takes "
                          f"W{'/'.join(map(str, EXPORT_WBITS))} A{'/'.join(map(str, EXPORT_ABITS))}")
    return QuantSpec(wbits=ckpt.wbits, abits=ckpt.abits, recipe=ckpt.quant.get("recipe", ""),
                     act_scales=ckpt.act_scale_floats(), weight_scales=ckpt.weight_scales)


def set_state_dtype(loaded, state_dtype: str, spec: QuantSpec | None) -> None:
    """The LM of `loaded` stores its decode states as `state_dtype` (MambaLM.set_state_dtype); one line when
    the model has no SSM state to store so, or (int8) no per-tensor conv1d scale."""
    from mq_deploy.families import family_of

    if loaded.architecture != "mamba_lm":
        raise MQUserError(f"{loaded.path}: --state-dtype applies to a language model's decode states")
    if not any(s.int8_scale for m in loaded.config.layer_configs() for s in family_of(m).states(m)):
        raise MQUserError(f"{loaded.path}: the model has no SSM state for --state-dtype to store (its caches take "
                          "--kv-cache at quantize time)")
    loaded.model.set_state_dtype(state_dtype, None if spec is None else spec.act_scales)
    loaded.config = loaded.model.cfg


def supported_opsets():
    import onnx.defs

    return range(21, onnx.defs.onnx_opset_version() + 1)


def save_model_atomic(proto, out_path: str, *, overwrite: bool = False, inputs=(), check: bool = True,
                      written_data: str | None = None) -> str:
    """Check the model and write it (and its external-data side file, for models past protobuf's
    2 GiB) under temporary names beside the destination, then rename both into place. The model is
    written a tensor at a time (onnx_file.write_model): never serialized whole, and not changed.
    written_data: the temporary side file a streamed export already wrote (onnx_file.ExternalSink) and the
    proto's external entries name; it is renamed into place with the model."""
    import onnx

    from mq_deploy import fileio
    from mq_deploy.export.onnx_file import initializer_bytes, repoint_external, write_model

    out_abs = fileio.check_target(out_path, overwrite, inputs, "ONNX file")     # a folder is refused there
    data_target = out_abs + ".data"
    external = written_data is not None or initializer_bytes(proto) > _EXTERNAL_DATA_BYTES
    if external:
        fileio.check_target(data_target, overwrite, inputs, "external data file")
    with fileio.atomic_path(out_abs, overwrite=overwrite, inputs=inputs, what="ONNX file") as tmp:
        if written_data is not None:
            write_model(proto, tmp)
            if check:
                onnx.checker.check_model(tmp, full_check=True)
            repoint_external(proto, tmp, os.path.basename(data_target))
            fileio.commit_file(written_data, data_target, overwrite, data_target)
            return out_abs
        if not external:
            write_model(proto, tmp)
            if check:
                onnx.checker.check_model(tmp, full_check=True)
            return out_abs
        tmp_data = fileio.temp_path(data_target)
        with fileio.tracked_temp(tmp_data):
            shell = write_model(proto, tmp, tmp_data)
            if check:
                onnx.checker.check_model(tmp, full_check=True)
            repoint_external(shell, tmp, os.path.basename(data_target))     # the final side-file name
            fileio.commit_file(tmp_data, data_target, overwrite, data_target)
    return out_abs


@contextlib.contextmanager
def _side_file(out: str, overwrite: bool, inputs, streamed: bool):
    """(sink, its temporary path) a streamed export writes its tensors into as they are made (removed if the export
    fails; save_model_atomic renames it into place), or (None, None) when the model is built whole."""
    if not streamed:
        yield None, None
        return
    from mq_deploy import fileio
    from mq_deploy.export.onnx_file import ExternalSink

    data_target = os.path.abspath(out) + ".data"
    fileio.check_target(data_target, overwrite, inputs, "external data file")
    tmp_data = fileio.temp_path(data_target)
    with fileio.tracked_temp(tmp_data):
        sink = ExternalSink(tmp_data)
        try:
            yield sink, tmp_data
        finally:
            sink.close()


def _carry_tokenizer(proto, loaded, tokenizer: str | None) -> None:
    """An LM's tokenizer.json travels in the artifact's metadata (mq.tokenizer_json), so `generate` needs
    nothing but the .onnx file. Byte-level LMs are marked mq.tokenizer = bytes by the graph builder."""
    if loaded.architecture != "mamba_lm" or not (tokenizer or loaded.tokenizer_path):
        return
    from mq_deploy.data.tokenizer import tokenizer_for

    codec = tokenizer_for(loaded, tokenizer)
    for prop in list(proto.metadata_props):
        if prop.key == "mq.tokenizer":
            proto.metadata_props.remove(prop)
    proto.metadata_props.add(key="mq.tokenizer", value="tokenizers")
    proto.metadata_props.add(key="mq.tokenizer_json", value=codec.json)


def export(model_path: str, out: str, step: bool = False, opset: int = OPSET, overwrite: bool = False,
           tokenizer: str | None = None, quantize_head: bool = False, int4_format: str = "qdq",
           head_bits: int = 8, state_dtype: str = "float32", stream: str = "auto") -> dict:
    """Export a model directory / checkpoint (FP or quantized) to ONNX; return a summary dict.
    quantize_head: the LM head as int8, or int4 with head_bits 4 (fakequant.quantize_head); verify's reference
    keeps the checkpoint's head, so the head's rounding is part of what verify measures.
    int4_format (W4 checkpoints): graph.INT4_FORMATS, "qdq" (TensorRT, any runtime) or ONNX Runtime's
    MatMulNBits ("matmulnbits": int8 activations, "matmulnbits-a16": float).
    state_dtype (step graphs): how the SSM states are stored between calls (config.STATE_DTYPES,
    models.state_codec); the artifact's mq.config records it and verify's reference does the same.
    stream: "on" reads the checkpoint a block at a time and writes each block's tensors into the external-data
    file as they are made (the graph holds the small tensors alone), "off" holds the model, "auto" streams
    a language model from loaders.STREAM_AUTO_BYTES of float32 weights up (loaders.streams)."""
    from mq_deploy.config import STATE_DTYPES

    if state_dtype not in STATE_DTYPES:
        raise MQUserError(f"state dtype must be one of {', '.join(STATE_DTYPES)}, got {state_dtype!r}")
    if state_dtype != "float32" and not step:
        raise MQUserError("--state-dtype sets how a decode-step graph stores its states: add --decode-step")
    from mq_deploy.models.loaders import load_model, streams

    if opset not in supported_opsets():
        raise MQUserError(f"--opset {opset} is not supported: QDQ int4 and the scan body need opset >= 21, and "
                          f"this onnx package knows up to {supported_opsets()[-1]}")
    from mq_deploy import fileio

    inputs = (model_path,) + ((tokenizer,) if tokenizer else ())
    fileio.check_target(out, overwrite, inputs, "ONNX file")      # before the long work
    if int4_format not in INT4_FORMATS:
        raise MQUserError(f"--int4-format must be one of {', '.join(INT4_FORMATS)}, got {int4_format!r}")
    from mq_deploy.quant.fakequant import HEAD_BITS

    if head_bits not in HEAD_BITS:
        raise MQUserError(f"--head-bits must be one of {', '.join(map(str, HEAD_BITS))}, got {head_bits!r}")
    if head_bits != 8 and not quantize_head:
        raise MQUserError("--head-bits applies with --quantize-head")
    streamed = streams(model_path, stream)
    loaded = load_model(model_path, lazy=streamed)
    spec = quant_spec(loaded)
    int4_head = quantize_head and head_bits == 4
    if int4_format != "qdq" and (spec is None or spec.wbits != 4) and not int4_head:
        raise MQUserError(f"--int4-format {int4_format} applies to W4 checkpoints and int4 heads; {model_path} is "
                          f"{'a float model' if spec is None else f'W{spec.wbits}A{spec.abits}'}")
    if state_dtype != "float32":
        set_state_dtype(loaded, state_dtype, spec)
    if quantize_head:
        from mq_deploy.export.graph import resident
        from mq_deploy.quant.fakequant import quantize_head as int8_head

        resident(loaded.model, "lm_head")
        int8_head(loaded.model, bits=head_bits)
    with _side_file(out, overwrite, inputs, streamed) as (sink, written):
        proto = build_model(loaded.model, spec, step=step, opset=opset, consume=True, int4_format=int4_format,
                            sink=sink)
        if sink is not None:
            sink.close()
        _carry_tokenizer(proto, loaded, tokenizer)
        loaded.model = None      # the rest of the float model (embedding, head): not held while the proto is written
        out_abs = save_model_atomic(proto, out, overwrite=overwrite, inputs=inputs, written_data=written)
    counts: dict = {}
    for n in proto.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        counts[key] = counts.get(key, 0) + 1
    nbytes = os.path.getsize(out_abs) + (os.path.getsize(out_abs + ".data") if streamed else 0)
    return {"path": out_abs, "nodes": len(proto.graph.node), "op_counts": counts, "bytes": nbytes,
            "layer_streamed": streamed,
            "quant": None if spec is None else f"{spec.recipe} W{spec.wbits}A{spec.abits}",
            "int4_format": int4_format if (spec is not None and spec.wbits == 4) or int4_head else None,
            "head": f"int{head_bits}" if quantize_head else "float",
            "graph": "step" if step else "full", "architecture": loaded.architecture}
