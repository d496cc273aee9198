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


# ---- writing ------------------------------------------------------------------------------------
# protobuf's upb runtime serializes a whole message for SerializeToString and for ByteSize alike, into an
# arena that grows by doubling and is then copied into a bytes object: about 3x the model's size at once
# (a 1.24 GiB model peaked 3.6 GiB above it). The writer below never serializes the model whole: the model
# without its initializers goes out first, then each initializer on its own. On the wire, a message field
# that occurs more than once is merged, and repeated fields inside it are appended in order, so the graph
# field written again per initializer parses back to the same model (every protobuf parser does this).

EXTERNAL_MIN_BYTES = 1024          # smaller tensors stay in the model file (onnx's own default)
_ALIGN_ABOVE, _ALIGN = 1 << 20, 1 << 16   # tensors past 1 MiB start on a 64 KiB boundary of the side file


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _write_nested(f, outer: int, inner: int, payload: bytes) -> None:
    """Field `outer` holding field `inner` holding payload, on the wire; the payload is not copied."""
    head = _varint(inner << 3 | 2) + _varint(len(payload))
    f.write(_varint(outer << 3 | 2) + _varint(len(head) + len(payload)))
    f.write(head)
    f.write(payload)


def _is_repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)        # protobuf >= 5.29; .label before that
    return rep if isinstance(rep, bool) else field.label == field.LABEL_REPEATED


def _copy_fields(src, dst, skip=()) -> None:
    """dst gets src's set fields but those named in skip (each copied, none shared)."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if _is_repeated(field):
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _shell(proto):
    """A copy of the model without its initializers (nodes, functions, metadata: the small part)."""
    import onnx

    shell = onnx.ModelProto()
    _copy_fields(proto, shell, skip=("graph",))
    _copy_fields(proto.graph, shell.graph, skip=("initializer",))
    return shell


def has_external_data(proto) -> bool:
    """Whether any initializer of `proto` (read with load_external_data=False) lies in an external-data file."""
    return any(t.data_location == 1 for t in proto.graph.initializer)     # TensorProto.EXTERNAL


def initializer_bytes(proto) -> int:
    """The serialized size of the model's initializers, one tensor at a time."""
    return sum(t.ByteSize() for t in proto.graph.initializer)


def write_model(proto, path: str, data_path: str | None = None):
    """Write `proto` to `path` (a new file) holding at most one tensor's serialization beside it.
    With data_path, tensors of >= EXTERNAL_MIN_BYTES raw data go to that new side file, and the model
    points at it by its base name. Returns the model as written when it has a side file (the initializers
    carry only their external-data entries: small), for `repoint_external`; else None. `proto` is not
    changed."""
    import onnx

    shell = _shell(proto)
    graph_no = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_no = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    try:
        if data_path is None:
            with open(path, "xb") as f:
                f.write(shell.SerializeToString())
                for t in proto.graph.initializer:
                    _write_nested(f, graph_no, init_no, t.SerializeToString())
                _sync(f)
            return None
        location = os.path.basename(data_path)
        with open(data_path, "xb") as data:
            offset = 0
            for t in proto.graph.initializer:
                raw = t.raw_data if t.HasField("raw_data") else b""
                entry = shell.graph.initializer.add()
                if len(raw) < EXTERNAL_MIN_BYTES:
                    entry.CopyFrom(t)
                    continue
                if len(raw) > _ALIGN_ABOVE and offset % _ALIGN:
                    pad = _ALIGN - offset % _ALIGN
                    data.write(bytes(pad))
                    offset += pad
                data.write(raw)
                _copy_fields(t, entry, skip=("raw_data", "data_location", "external_data"))
                entry.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                    entry.external_data.add(key=key, value=str(value))
                offset += len(raw)
                del raw
            _sync(data)
        with open(path, "xb") as f:
            f.write(shell.SerializeToString())
            _sync(f)
        return shell
    except OSError as e:
        raise MQUserError(f"{path}: cannot write the ONNX model ({e.strerror or e})") from None


class ExternalSink:
    """The side file of a model written while it is built (a layer-streamed export): each tensor of
    >= EXTERNAL_MIN_BYTES raw data goes to the file as soon as it is made and its TensorProto keeps only the
    external-data entry, so the graph being built holds its small tensors alone. Same layout as write_model's
    side file (aligned past _ALIGN_ABOVE); the entries name `path`'s base name until repoint_external."""

    def __init__(self, path: str):
        self.path, self.offset = path, 0
        self._f = open(path, "xb")

    def put(self, t) -> None:
        """Move tensor t's data (raw, or INT4 codes packed in int32_data) into the file, in place."""
        import onnx

        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and len(t.int32_data):
            import numpy as np

            t.raw_data = np.asarray(t.int32_data, dtype=np.int32).astype(np.uint8).tobytes()   # the packed nibbles
            t.ClearField("int32_data")
        raw = t.raw_data if t.HasField("raw_data") else b""
        if len(raw) < EXTERNAL_MIN_BYTES:
            return
        if len(raw) > _ALIGN_ABOVE and self.offset % _ALIGN:
            self._write(bytes(_ALIGN - self.offset % _ALIGN))
        start = self.offset
        self._write(raw)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", os.path.basename(self.path)), ("offset", start), ("length", len(raw))):
            t.external_data.add(key=key, value=str(value))

    _CHUNK = 32 << 20       # put_array writes a strided array this many bytes of rows at a time

    def put_array(self, array, name: str):
        """A TensorProto named `name` whose data is numpy `array`'s, written straight to the file (a transposed
        or otherwise strided view in chunks of rows, never copied whole)."""
        import numpy as np
        import onnx
        from onnx import helper

        t = onnx.TensorProto()
        t.name = name
        t.dims.extend(array.shape)
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        if array.nbytes > _ALIGN_ABOVE and self.offset % _ALIGN:
            self._write(bytes(_ALIGN - self.offset % _ALIGN))
        start = self.offset
        flat = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
        rows = max(1, self._CHUNK // max(1, flat[0].nbytes))
        for i in range(0, flat.shape[0], rows):
            self._write(np.ascontiguousarray(flat[i:i + rows]).astype(array.dtype.newbyteorder("<"), copy=False))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", os.path.basename(self.path)), ("offset", start),
                           ("length", self.offset - start)):
            t.external_data.add(key=key, value=str(value))
        return t

    def _write(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            raise MQUserError(f"{self.path}: cannot write the external data ({e.strerror or e})") from None
        self.offset += memoryview(data).nbytes

    def close(self) -> None:
        if not self._f.closed:
            _sync(self._f)
            self._f.close()


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def repoint_external(shell, path: str, location: str) -> None:
    """Rewrite model file `path` (written by write_model with a side file) to name side file `location`."""
    for t in shell.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    with open(path, "r+b") as f:
        f.write(shell.SerializeToString())
        f.truncate()
        _sync(f)
