"""How a decode-step graph stores its SSM states between calls (`export --decode-step --state-dtype`), in
PyTorch and as ONNX nodes, side by side: one rounding rule, written twice, parity-tested
(tests/test_state_dtype.py). A third time in C++ (plugins/selective_scan/ort/state_codec.cpp): the fused step
ops with int8 states (mq::SelectiveStateUpdateInt8State, mq::SSDStateUpdateInt8State) decode and encode their
layer themselves, and their function bodies run the nodes below (tests/test_state_codec_native.py,
tests/test_state_update_int8.py).

The layers compute in float32 as always; a state is converted on its way out of a call and back on its way in
(per call: a prefill of L tokens rounds once, a decode step once per token). What each state becomes is
declared by its family (StateSpec.int8_scale) and laid out by families.stored_states:

- float16: a cast (round to nearest even), and back.
- int8, "point:P" (the conv state): q = round(x / s) on the static scale s of the layer's quant point P.
  The conv state holds the conv1d point's quantized inputs, which lie on that grid, so this is exact for a
  quantized model.
- int8, "rows" (the SSM state): a scale per row of the last axis (Mamba1: per channel over d_state; Mamba2:
  per (head, head_dim) over d_state), carried as the float16 state `<name>_scale`:
      s = float16(min(amax(|h|) / 127 * (1 + 2^-10) + 2^-24, 65504)),   q = round(h / s),   h' = q * s
  (the arithmetic before the cast in float32, in this order). The scale is chosen again at every call from
  the row's current values (dynamic), so a state that grows over a long generation is never clipped; a static
  scale from calibration clipped the sample LM's state and was dropped (docs/results.md, state fidelity).
  float16, not float32: 2 bytes per row, so Mamba1's rows of 16 codes take 18 bytes, not 20 (3.6x fewer than
  float32 with the conv state, not 3.3x). The factor and the 2^-24 (float16's smallest step) make the cast's
  round-to-nearest land at or above amax / 127, so no code of a row clips; the step is then at most
  about 2^-10 coarser than amax / 127 (2^-24 absolute for the tiniest rows), and an all-zero row gets 2^-24.
  The range: rows up to 127 * 65504 (8.3e6) in magnitude; a larger one saturates at that (a float16 state
  holds only 65504).
Rounding is half to even and saturates to [-128, 127], as ONNX's QuantizeLinear (which the graph uses,
with scale 1 on the divided values)."""

from __future__ import annotations

import numpy as np

from mq_deploy.errors import MQUserError

QMAX = 127.0
SCALE_DTYPE = "float16"    # how a "rows" state's per-row scales are stored (families.stored_states reads it)
SCALE_UP = 1.0 + 2.0 ** -10    # with SCALE_MIN added, the cast to float16 never rounds a scale below amax / 127
SCALE_MIN = 2.0 ** -24     # float16's smallest step: an all-zero row's scale
SCALE_MAX = 65504.0        # float16's largest: rows past QMAX * SCALE_MAX in magnitude saturate


def _point(spec) -> str:
    """The quant point P of a "point:P" state."""
    return spec.int8_scale.split(":", 1)[1]


def _point_scale(scales: dict, layer: int, spec) -> float:
    point = _point(spec)
    s = scales.get((layer, point))
    if s is None:
        raise MQUserError(f"an int8 {spec.name} needs the static scale of layer {layer}'s {point} quant point; "
                          "int8 decode states need a quantized checkpoint (use --state-dtype fp16 for a float one)")
    return s


def conv_scales(model_cfg, act_scales: dict | None) -> dict:
    """{(layer, point): scale} of every "point:P" int8 state of a model in int8 state_dtype, from a
    quantized checkpoint's per-tensor activation scales {`layerN.point`: scale} (export's QuantSpec.act_scales);
    {} for other state dtypes. One line when a scale is missing (a float model)."""
    from mq_deploy.families import stored_states
    from mq_deploy.models.points import mixer_prefix

    out = {}
    if getattr(model_cfg, "state_dtype", "float32") != "int8":
        return out
    for i, cfg in enumerate(model_cfg.layer_configs()):
        for spec in stored_states(model_cfg, cfg):
            if spec.dtype == "int8" and spec.int8_scale and spec.int8_scale.startswith("point:"):
                point = _point(spec)
                s = None if act_scales is None else act_scales.get(mixer_prefix(i) + point)
                if s is not None:           # (np.asarray: np.size of a torch tensor is its size method)
                    s = np.asarray(s, dtype=np.float32).reshape(-1)
                    s = float(s[0]) if s.size == 1 else None
                if s is None or not np.isfinite(s) or s <= 0:
                    raise MQUserError(f"--state-dtype int8 stores layer {i}'s {spec.name} on its {point} quant "
                                      "point's per-tensor scale, and the model has none: int8 decode states need "
                                      "a checkpoint quantized per tensor (use --state-dtype fp16 for a float model)")
                out[(i, point)] = s
    return out


# ---- PyTorch -----------------------------------------------------------------------------------------

def _round_int8(v):
    import torch

    return torch.clamp(torch.round(v), -128, 127).to(torch.int8)


def rows_int8(t):
    """The "rows" rule on a float tensor: (int8 codes, float16 scale per row of the last axis)."""
    import torch

    t = t.to(torch.float32)
    s = torch.clamp_max(t.abs().amax(-1) / QMAX * SCALE_UP + SCALE_MIN, SCALE_MAX).to(torch.float16)
    return _round_int8(t / s.to(torch.float32).unsqueeze(-1)), s


def encode(layer: int, specs, logical: tuple, scales: dict) -> tuple:
    """Layer `layer`'s float states (its family's order) -> the stored tuple (`specs`, its stored_states: the
    states, then the per-row scales). scales: {(layer, point): scale} (conv_scales)."""
    import torch

    out, extra = [], []
    for spec, t in zip((s for s in specs if s.scale_of is None), logical):
        if spec.dtype == "float32" or spec.int8_scale is None:     # not converted (an int8 KV cache stores itself)
            out.append(t)
        elif spec.dtype == "float16":
            out.append(t.to(torch.float16))
        elif spec.int8_scale == "rows":
            q, s = rows_int8(t)
            out.append(q)
            extra.append(s)
        else:
            s = torch.tensor(_point_scale(scales, layer, spec), dtype=torch.float32)
            out.append(_round_int8(t.to(torch.float32) / s))
    return tuple(out + extra)


def decode(layer: int, specs, stored: tuple, scales: dict) -> tuple:
    """The inverse of encode: a layer's stored states -> float32 states in its family's order."""
    import torch

    by_name = {s.scale_of: t for s, t in zip(specs, stored) if s.scale_of is not None}
    out = []
    for spec, t in zip(specs, stored):
        if spec.scale_of is not None:
            continue
        if spec.dtype == "float32" or spec.int8_scale is None:
            out.append(t)
        elif spec.dtype == "float16":
            out.append(t.to(torch.float32))
        elif spec.int8_scale == "rows":
            out.append(t.to(torch.float32) * by_name[spec.name].to(torch.float32).unsqueeze(-1))
        else:
            out.append(t.to(torch.float32) * torch.tensor(_point_scale(scales, layer, spec), dtype=torch.float32))
    return tuple(out)


# ---- ONNX --------------------------------------------------------------------------------------------
# The rule as nodes, on two primitives so that a graph (export/graph.py's _Builder) and a function body (the
# fused step ops with int8 states: export/state_update_op.py, export/ssd_state_update_op.py) emit the same
# nodes: op(op_type, inputs, **attrs) -> output name; const(numpy array) -> name of a constant tensor.

def rows_decode_nodes(op, const, q: str, scale: str) -> str:
    """float32 of a "rows" int8 state: q * float(scale) per row."""
    from onnx import TensorProto

    s = op("Cast", [scale], to=TensorProto.FLOAT)
    return op("Mul", [op("Cast", [q], to=TensorProto.FLOAT), op("Unsqueeze", [s, const(np.array([-1], np.int64))])])


def rows_encode_nodes(op, const, value: str) -> tuple:
    """(int8 codes, float16 row scales) of a float32 "rows" state (the rule in the module doc)."""
    from onnx import TensorProto

    one, zp = const(np.array(1.0, np.float32)), const(np.array(0, dtype=np.int8))
    f32 = lambda v: const(np.array(v, np.float32))                            # noqa: E731
    amax = op("ReduceMax", [op("Abs", [value]), const(np.array([-1], np.int64))], keepdims=0)
    s = op("Mul", [op("Div", [amax, f32(QMAX)]), f32(SCALE_UP)])
    s16 = op("Cast", [op("Min", [op("Add", [s, f32(SCALE_MIN)]), f32(SCALE_MAX)])], to=TensorProto.FLOAT16)
    s32 = op("Unsqueeze", [op("Cast", [s16], to=TensorProto.FLOAT), const(np.array([-1], np.int64))])
    return op("QuantizeLinear", [op("Div", [value, s32]), one, zp]), s16


def grid_decode_nodes(op, q: str, scale: str) -> str:
    """float32 of a "point:P" int8 state: q * its static scale (a tensor name)."""
    from onnx import TensorProto

    return op("Mul", [op("Cast", [q], to=TensorProto.FLOAT), scale])


def grid_encode_nodes(op, const, value: str, scale: str) -> str:
    """int8 codes of a "point:P" state: round(value / scale), QuantizeLinear's rounding."""
    one, zp = const(np.array(1.0, np.float32)), const(np.array(0, dtype=np.int8))
    return op("QuantizeLinear", [op("Div", [value, scale]), one, zp])


def _layer_scales(scales: dict, si) -> np.ndarray:
    """[layers, 1, ..., 1] float32: each layer's static scale of a stacked "point:P" state input."""
    s = np.array([_point_scale(scales, i, si.spec) for i in si.layers], dtype=np.float32)
    return s.reshape((len(si.layers),) + (1,) * (len(si.dims) - 1))


def _builder_prims(b):
    """op and const over export/graph.py's _Builder."""
    def const(a):
        if a.dtype == np.int64:
            return b.i64(a.tolist())
        if a.dtype == np.float32:
            return b.f32(a, "state_codec")
        return b.const(a, "state_codec")
    return (lambda op_type, inputs, **attrs: b.op(op_type, inputs, **attrs)), const


def emit_decode(b, si, scale_input: str | None, scales: dict) -> str:
    """Nodes turning the stored step-graph input `si` (a StateInput) into float32; returns the tensor name."""
    from onnx import TensorProto

    op, const = _builder_prims(b)
    if si.spec.dtype == "float16":
        return b.op("Cast", [si.name], to=TensorProto.FLOAT)
    if si.spec.int8_scale == "rows":
        return rows_decode_nodes(op, const, si.name, scale_input)
    return grid_decode_nodes(op, si.name, b.f32(_layer_scales(scales, si), "state_scale"))


def emit_encode(b, si, value: str, scales: dict) -> tuple:
    """Nodes turning the float32 output `value` of the stored state `si` into its stored form; returns
    (stored tensor, its row scales or None)."""
    from onnx import TensorProto

    op, const = _builder_prims(b)
    if si.spec.dtype == "float16":
        return b.op("Cast", [value], to=TensorProto.FLOAT16), None
    if si.spec.int8_scale == "rows":
        return rows_encode_nodes(op, const, value)
    return grid_encode_nodes(op, const, value, b.f32(_layer_scales(scales, si), "state_scale")), None


__all__ = ["QMAX", "SCALE_DTYPE", "SCALE_MAX", "SCALE_MIN", "SCALE_UP", "conv_scales", "decode", "emit_decode",
           "emit_encode", "encode", "grid_decode_nodes", "grid_encode_nodes", "rows_decode_nodes", "rows_encode_nodes",
           "rows_int8"]
