"""ONNX graphs of our Mamba LM and Vim: float32, or QDQ int8/int4 with the int8 mq::SelectiveScan.

One builder serves every form:
- FP32: float weights, mq::SelectiveScanFloat nodes (function bodies).
- Quantized (`QuantSpec` from a quantized checkpoint): weights of in_proj, conv1d, x_proj, dt_proj and
  out_proj are int8 (int4 for W4) initializers with per-output-channel DequantizeLinear; activations
  at every quant point of MambaMixer.QUANT_POINTS get QuantizeLinear -> DequantizeLinear with the
  calibrated per-tensor scales; the scan inputs x, dt, B, C, z go int8 from their QuantizeLinear into
  mq::SelectiveScan (scales as node attributes). Embeddings, norms, heads, A, D, the dt bias and the
  online rotation (a MatMul with one shared constant) stay float32, as in the fake-quantized model.
- `step=True` (LMs): a stateful graph (input_ids [batch, seq], conv_state [layers, batch, Di, K-1],
  ssm_state [layers, batch, Di, N] -> logits, conv_state_out, ssm_state_out). With seq = 1 it is
  the decode step; with the whole prompt it is the prefill. With zero states it equals the full graph.

Batch and sequence length are dynamic and the graph does not depend on the sequence length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from mq_deploy.errors import MQInternalError, MQUserError
from mq_deploy.export import qlinear_op
from mq_deploy.export.onnx_file import EXTERNAL_MIN_BYTES
from mq_deploy.export.scan_op import DOMAIN
from mq_deploy.families import family_of, state_inputs
from mq_deploy.models.mamba import MambaLM
from mq_deploy.models.points import mixer_prefix

OPSET = 21
IR_VERSION = 10          # what ONNX Runtime >= 1.18 loads


@dataclass
class QuantSpec:
    """What the exporter needs from a quantized checkpoint."""
    wbits: int
    abits: int
    act_scales: dict = field(default_factory=dict)       # quant point -> float scale (a list: one per group)
    weight_scales: dict = field(default_factory=dict)    # parameter name -> per-channel scale tensor
    recipe: str = ""

    def __post_init__(self):
        if self.wbits not in (4, 8):
            raise MQUserError(f"export supports W8 and W4 weights, not W{self.wbits}")
        if self.abits != 8:
            raise MQUserError(f"export supports 8-bit activations (the int8 scan), not A{self.abits}; "
                              "quantize with --abits 8")


def _digest(array: np.ndarray) -> str:
    """sha1 of an array's bytes in C order: of its memory when C-contiguous (no copy), else a block of rows
    at a time."""
    if array.flags.c_contiguous:
        return hashlib.sha1(memoryview(array).cast("B")).hexdigest()
    h = hashlib.sha1()
    rows = max(1, (32 << 20) // max(1, array[0].nbytes))
    for i in range(0, array.shape[0], rows):
        h.update(np.ascontiguousarray(array[i:i + rows]).tobytes())
    return h.hexdigest()


class _Builder:
    """Collects nodes and initializers with unique names; identical constants are stored once."""

    def __init__(self, opset, inits=None, sink=None):
        """inits: the repeated initializer field of the ModelProto being built (each tensor is made in place:
        collecting them in a list and passing it to make_graph / make_model would copy every weight twice).
        sink: an onnx_file.ExternalSink that takes each large tensor's data as it is made (streamed export)."""
        from onnx import ModelProto

        self.nodes, self._n, self._consts = [], 0, {}
        self.inits = inits if inits is not None else ModelProto().graph.initializer
        self.opset, self.sink = opset, sink

    def _add(self, tensor):
        if self.sink is not None:
            self.sink.put(tensor)
        self.inits.add().CopyFrom(tensor)

    def name(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def _intern(self, kind, array, hint, make):
        """The initializer name of `array` (stored as `kind`), made once by make(name); with a sink, a large
        numpy array goes to it straight (ExternalSink.put_array), strided or not."""
        key = (kind, array.shape, _digest(array))
        if key not in self._consts:
            name = self.name(hint)
            if self.sink is not None and kind != "int4" and array.nbytes >= EXTERNAL_MIN_BYTES:
                self.inits.add().CopyFrom(self.sink.put_array(array, name))
            else:
                self._add(make(name))   # one tensor's copy at a time, freed at once
            self._consts[key] = name
        return self._consts[key]

    def const(self, array, hint="c"):
        from onnx import numpy_helper

        array = np.asarray(array)
        if self.sink is None or array.nbytes < EXTERNAL_MIN_BYTES:
            array = np.asarray(array, order="C")   # no copy if C-contiguous (ascontiguousarray makes a scalar 1-D)
        return self._intern(array.dtype.str, array, hint,
                            lambda name: numpy_helper.from_array(np.asarray(array, order="C"), name))

    def int4(self, q: np.ndarray, hint):
        from onnx import TensorProto, helper

        q = np.array(q, dtype=np.int8, order="C")
        return self._intern("int4", q, hint,
                            lambda name: helper.make_tensor(name, TensorProto.INT4, q.shape, q.ravel().tolist()))

    def f32(self, t, hint):
        # float64 -> float32 rounds as numpy's astype would; float32 / bf16 / fp16 convert exactly. Never via a
        # float64 copy: a vocabulary-sized embedding would take 2x its float32 size for nothing.
        if torch.is_tensor(t):
            t = t.detach().to(torch.float32)
            return self.const((t if self.sink is not None else t.contiguous()).numpy(), hint)   # a sink takes views
        return self.const(np.asarray(t).astype(np.float32), hint)

    def op(self, op_type, inputs, hint=None, n_out=1, domain=None, **attrs):
        from onnx import helper

        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def i64(self, values, hint="i"):
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def own(self, array, hint):
        """An initializer of this node's alone (never shared, as const's identical constants are)."""
        from onnx import numpy_helper

        name = self.name(hint)
        self._add(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def axis_zero_point(self, n: int):
        """The explicit int8 zero points (all 0) of a per-axis weight DequantizeLinear of n channels: ONNX
        Runtime's exact int8 GEMM on CPUs without VNNI (backends.ort.runner.EXACT_INT8_CONFIG) converts the
        weights and zero points to u8 in place, so it fails on an implicit zero point, and on a weight or zero
        point another DequantizeLinear shares: both are the node's own."""
        return self.own(np.zeros(n, dtype=np.int8), "w_zp")

    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def rms_norm(self, x, norm, eps=None):
        """x / rms(x) * norm.weight; norm None: weightless (FalconMamba's dt/B/C norm) with `eps`.
        Written as Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul, the pattern ONNX Runtime fuses into one
        SimplifiedLayerNormalization node (6 nodes less per layer in every session)."""
        ms = self.op("ReduceMean", [self.op("Pow", [x, self.f32(np.array(2.0), "two")]), self.i64([-1])], keepdims=1)
        eps = self.f32(np.array(norm.eps if norm is not None else eps), "eps")
        y = self.op("Div", [x, self.op("Sqrt", [self.op("Add", [ms, eps])])])
        return y if norm is None else self.op("Mul", [y, self.f32(norm.weight, "norm_w")])

    def flip_time(self, x):
        return self.op("Slice", [x, self.i64([-1]), self.i64([np.iinfo(np.int64).min]), self.i64([1]),
                                 self.i64([-1])], "flip")

    def batch_dim(self, x):
        return self.op("Gather", [self.op("Shape", [x]), self.i64([0])], axis=0)


class _Graph:
    """The model-specific part: float or quantized weights and activations."""

    def __init__(self, b: _Builder, quant: QuantSpec | None, rotation: str = "factored", small_weights: str = "qdq",
                 fused_step: bool = True, int4_format: str = "qdq"):
        if small_weights not in SMALL_WEIGHTS:
            raise MQUserError(f"small_weights must be one of {', '.join(SMALL_WEIGHTS)}, got {small_weights!r}")
        if int4_format not in INT4_FORMATS:
            raise MQUserError(f"int4_format must be one of {', '.join(INT4_FORMATS)}, got {int4_format!r}")
        self.b, self.quant, self.rotation, self.small_weights = b, quant, rotation, small_weights
        self.fused_step, self.int4_format = fused_step, int4_format

    # -- weights -------------------------------------------------------------------------------------
    def weight(self, name, w: torch.Tensor, transpose: bool, small: bool = False):
        """Float weight, or int8/int4 + per-channel DequantizeLinear. transpose: store [in, out] for MatMul.
        small (conv1d, x_proj, dt_proj) with small_weights "float": the dequantized values q * s as a
        float32 constant (bitwise what the DequantizeLinear computes), since ORT fuses none of these
        three into an integer kernel and would dequantize them again on every run (SMALL_WEIGHTS)."""
        b = self.b
        if self.quant is None:
            return b.f32(w.t() if transpose else w, "w")
        if small and self.small_weights == "float":
            wf = self.dequantized(name, w)
            return b.const(np.ascontiguousarray((wf.t() if transpose else wf).numpy()), "w_deq")
        q, s64 = self.grid(name, w)
        return self._dequantize_weight(q, s64, transpose)

    def _dequantize_weight(self, q, s64, transpose: bool):
        """int8/int4 codes q [out, ...] with per-output-channel scales s64 -> their DequantizeLinear."""
        b = self.b
        if transpose:
            q = q.t()
        if self.quant.wbits == 4:
            return b.op("DequantizeLinear", [b.int4(q.numpy(), "wq"), b.f32(s64, "w_scale")], "w_dq",
                        axis=1 if transpose else 0)
        return b.op("DequantizeLinear", [b.own(q.numpy(), "wq"), b.f32(s64, "w_scale"), b.axis_zero_point(len(s64))],
                    "w_dq", axis=1 if transpose else 0)

    def grid(self, name, w: torch.Tensor):
        """(q int8 tensor, per-output-channel float64 scales) of a quantized weight, checked on its grid."""
        s = self.quant.weight_scales.get(name)
        if s is None:
            raise MQUserError(f"the quantized checkpoint has no scale for weight {name}")
        w64, s64 = w.detach().double(), s.detach().double().reshape(-1)
        q = torch.round(w64 / s64.reshape([-1] + [1] * (w64.dim() - 1)))
        qm = 2 ** (self.quant.wbits - 1) - 1
        err = (q * s64.reshape([-1] + [1] * (w64.dim() - 1)) - w64).abs().max().item()
        if q.abs().max().item() > qm or err > 1e-5 * max(1e-30, w64.abs().max().item()):
            raise MQInternalError(f"{name}: the stored weight is not on its W{self.quant.wbits} grid "
                                  f"(off by {err:.2e})")
        return q.to(torch.int8), s64

    def dequantized(self, name, w: torch.Tensor) -> torch.Tensor:
        """q * s of a quantized weight in float32: bitwise what its per-channel DequantizeLinear computes."""
        q, s64 = self.grid(name, w)
        return q.to(torch.float32) * s64.to(torch.float32).reshape([-1] + [1] * (q.dim() - 1))

    def nbits(self) -> bool:
        """W4 weights as com.microsoft.MatMulNBits (INT4_FORMATS) rather than int4 DequantizeLinear + MatMul."""
        return self.quant is not None and self.quant.wbits == 4 and self.int4_format != "qdq"

    def matmul(self, x, name, w: torch.Tensor, small=False):
        """x @ w^T of a linear's weight w [out, in]: float, QDQ (weight()), or one MatMulNBits (nbits())."""
        if self.nbits() and not (small and self.small_weights == "float"):
            return self._matmul_nbits(x, *self.grid(name, w))
        return self.b.op("MatMul", [x, self.weight(name, w, transpose=True, small=small)])

    def _matmul_nbits(self, x, q, s64):
        """x @ (q * s)^T as com.microsoft.MatMulNBits: int4 codes q [N, K] with per-output-channel scales s64
        [N]. Its blockwise layout (nbits_weight) repeats each channel's scale over its blocks, so the weight it
        holds is exactly q * s; ORT packs it once when the session starts and never dequantizes it again."""
        b = self.b
        n, k = q.shape
        packed, scales = nbits_weight(q.numpy(), s64.numpy(), NBITS_BLOCK)
        acc = NBITS_ACCURACY[self.int4_format]
        return b.op("MatMulNBits", [x, b.const(packed, "wq4"), b.f32(scales, "w_scale")], "matmul_nbits",
                    domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=NBITS_BLOCK, accuracy_level=acc)

    def linear(self, x, lin, name, small=False):
        y = self.matmul(x, name, lin.weight, small)
        return self.b.op("Add", [y, self.b.f32(lin.bias, "bias")]) if lin.bias is not None else y

    def linears(self, x, parts) -> list:
        """[x @ W_i^T + b_i] of linears that read the same input, as ONE MatMul over their weights concatenated
        along the output channels, split back. parts: [(linear, weight name)]. Why: ONNX Runtime turns a
        QDQ MatMul into its int8 kernel (MatMulIntegerToFloat) only when the activation's QuantizeLinear
        feeds that one MatMul; with two or three readers (an MLP's up and gate, attention's q, k and v)
        every one stayed a float MatMul on dequantized weights (measured, ORT 1.32: 76 of a Granite-4.0-H
        shape's 168 linears), and separate QuantizeLinear nodes are merged again by its CSE. The per-channel
        weight scales concatenate with the channels, so each output is what linear() computes."""
        if len(parts) == 1:
            return [self.linear(x, *parts[0])]
        b = self.b
        if self.quant is None:
            y = b.op("MatMul", [x, b.f32(torch.cat([lin.weight.detach().float() for lin, _ in parts], 0).t(), "w")])
        else:
            grids = [self.grid(name, lin.weight) for lin, name in parts]
            q, s = torch.cat([q for q, _ in grids], 0), torch.cat([s for _, s in grids])
            y = (self._matmul_nbits(x, q, s) if self.nbits()
                 else b.op("MatMul", [x, self._dequantize_weight(q, s, True)]))
        if any(lin.bias is not None for lin, _ in parts):
            bias = torch.cat([lin.bias.detach().float() if lin.bias is not None else torch.zeros(lin.out_features)
                              for lin, _ in parts])
            y = b.op("Add", [y, b.f32(bias, "bias")])
        return b.op("Split", [y, b.i64([lin.out_features for lin, _ in parts])], n_out=len(parts), axis=-1)

    # -- activations ---------------------------------------------------------------------------------
    def _scale(self, point):
        s = self.quant.act_scales.get(point)
        if s is None:
            raise MQUserError(f"the quantized checkpoint has no activation scale for {point}")
        if isinstance(s, (list, tuple)):
            raise MQInternalError(f"{point} has per-group scales where the exporter takes one per tensor")
        return float(s)

    def scales(self, point, channels: int) -> list:
        """The scales of a point as a list: [one] per tensor, or one per channel (a per-group scale expanded
        over its channels) for points calibrated per group (QuantConfig.ssm_scales "grouped")."""
        s = self.quant.act_scales.get(point)
        if s is None:
            raise MQUserError(f"the quantized checkpoint has no activation scale for {point}")
        if not isinstance(s, (list, tuple)):
            return [float(s)]
        if channels % len(s):
            raise MQUserError(f"{point}: {len(s)} scale groups do not divide its {channels} channels")
        return [float(v) for v in s for _ in range(channels // len(s))]

    def _qparams(self, point, channels):
        b = self.b
        if channels is None or not isinstance(self.quant.act_scales.get(point), (list, tuple)):
            return [b.f32(np.array(self._scale(point)), "a_scale"), b.const(np.array(0, dtype=np.int8), "zp")], {}
        s = np.asarray(self.scales(point, channels), dtype=np.float32)
        return [b.const(s, "a_scale"), b.const(np.zeros(channels, dtype=np.int8), "zp")], {"axis": -1}

    def q(self, x, point, channels=None):
        """int8 QuantizeLinear of x at a quant point (per channel of the last axis where the point has
        per-group scales; `channels` is that axis' size)."""
        params, axis = self._qparams(point, channels)
        return self.b.op("QuantizeLinear", [x, *params], "q", **axis)

    def dq(self, q, point, channels=None):
        params, axis = self._qparams(point, channels)
        return self.b.op("DequantizeLinear", [q, *params], "dq", **axis)

    def qdq(self, x, point):
        return x if self.quant is None else self.dq(self.q(x, point), point)

    def online_rotation(self, y, R):
        return _online_rotation(self.b, y, R, self.rotation)


ROTATIONS = ("factored", "dense")
# "qdq": every quantized weight as int8/int4 + DequantizeLinear (what TensorRT fuses). "float": conv1d,
# x_proj and dt_proj as their dequantized float32 values. In ORT 1.32 none of those three becomes an
# integer kernel (x_proj's int8 input also feeds the scan op; the conv has a float input), so their
# DequantizeLinear ran on every call: 28 % of a mamba-130m W8A8 decode step in the profile.
SMALL_WEIGHTS = ("qdq", "float")

# How W4 linears are written. "qdq": int4 initializers with per-channel DequantizeLinear -> MatMul, the form
# TensorRT parses (and every ONNX runtime runs); ONNX Runtime 1.32 leaves that pattern unfused behind an
# activation QuantizeLinear -> DequantizeLinear and dequantizes every int4 weight to float on every call.
# "matmulnbits": ONNX Runtime's contrib op com.microsoft.MatMulNBits, the layout its CPU kernels (MLAS
# SQNBitGemm) read directly, with accuracy_level 4: it quantizes its float input to int8 per block of
# NBITS_BLOCK values along K at run time (symmetric, scale = block max / 127) and accumulates in integers.
# The input is already on the static int8 grid of the quant point, so this re-quantization is the one
# difference from the W4A8 reference (exact where a block's largest code is 127). "matmulnbits-a16": the
# same op with accuracy_level 1, float activations (W4A16 kernels: fp32 on CPU): the W4A8 reference to
# float rounding. The MatMulNBits forms are ONNX Runtime's only: TensorRT takes the "qdq" file.
INT4_FORMATS = ("qdq", "matmulnbits", "matmulnbits-a16")
NBITS_ACCURACY = {"matmulnbits": 4, "matmulnbits-a16": 1}
# blocks of 128 along K. Our scales are per channel, so the block only sets how often MatMulNBits repeats a
# channel's float32 scale (at 32, 4 bytes per 16 bytes of codes: a quarter more weight bytes per decoded
# token; at 128, 1/16) and the granularity of its run-time activation scale at accuracy_level 4 (on the LM
# sample blocks of 32, 64 and 128 gave the same verify figures, top-1 agreement 98.2 %). Measured at the
# mamba-130m shapes (ORT 1.32, AVX2, 2 threads, batch 1): 128 is a few percent faster than 32.
NBITS_BLOCK = 128
MS_DOMAIN = "com.microsoft"


def nbits_weight(q: np.ndarray, scale: np.ndarray, block: int = NBITS_BLOCK):
    """MatMulNBits' B and scales of int4 codes q [N, K] (symmetric, |q| <= 8) with one scale per output channel
    (scale [N]) or per block (scale [N, blocks]): B uint8 [N, ceil(K / block), block / 2], the unsigned codes
    q + 8 (the op's default zero point for 4 bits, so no zero-point input) two per byte, element 2i in the low
    nibble; K padded with code 8 (zero); scales [N * blocks], a channel's scale repeated over its blocks."""
    q = np.asarray(q)
    n, k = q.shape
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise MQInternalError("int4 codes outside [-8, 7]")
    nb = -(-k // block)
    u = np.full((n, nb * block), 8, dtype=np.uint8)
    u[:, :k] = (q.astype(np.int16) + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(n, nb, block // 2)
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim == 2 and scale.shape != (n, nb):
        raise MQInternalError(f"block scales of shape {scale.shape} for {n} channels of {nb} blocks")
    return np.ascontiguousarray(packed), (scale if scale.ndim == 2 else np.repeat(scale.reshape(-1, 1), nb, 1)).ravel()


def nbits_codes(packed: np.ndarray, k: int) -> np.ndarray:
    """The int4 codes [N, K] of MatMulNBits' B (nbits_weight's inverse; zero point 8)."""
    packed = np.asarray(packed, dtype=np.uint8)
    n = packed.shape[0]
    flat = packed.reshape(n, -1)
    u = np.empty((n, flat.shape[1] * 2), dtype=np.int16)
    u[:, 0::2], u[:, 1::2] = flat & 0x0F, flat >> 4
    return (u[:, :k] - 8).astype(np.int8)


def _online_rotation(b: _Builder, y, R, mode="factored"):
    """y @ R. A Kronecker-structured R = P kron Q (the Hadamard) runs as y -> [.., a, q], Y Q, P^T (Y Q),
    back to [.., n]: n (a + q) MACs per row instead of n^2 (mamba-130m: 1536 = 32 x 48, 123k vs 2.4M).
    Anything else, or mode "dense", is one MatMul with R."""
    if mode not in ROTATIONS:
        raise MQUserError(f"rotation must be one of {', '.join(ROTATIONS)}, got {mode!r}")
    from mq_deploy.ops.hadamard import factors_of

    f = factors_of(R) if mode == "factored" else None
    if f is None:
        return b.op("MatMul", [y, b.f32(R, "out_rot")])
    P, Q = f
    a, q = P.shape[0], Q.shape[0]
    y4 = b.op("Reshape", [y, b.i64([0, 0, a, q])], "rot_split")
    yq = b.op("MatMul", [y4, b.f32(Q, "out_rot_q")])
    ypq = b.op("MatMul", [b.f32(P.T, "out_rot_pt"), yq])
    return b.op("Reshape", [ypq, b.i64([0, 0, a * q])], "rot_join")


def _lm_head(b: _Builder, h, head, int4_format: str = "qdq"):
    """float MatMul; or, for a quantize_head'ed model (fakequant.Int8Head), int8 per-channel weights with
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) (activations per tensor at
    run time, uint8), or DequantizeLinear -> MatMul (act "none"); an Int4Head (scales per block of 32 inputs)
    as MatMulNBits (int4_format: its accuracy level, NBITS_ACCURACY), or for "qdq" a blocked int4
    DequantizeLinear (axis 0 of the [d, V] weight, block_size) -> MatMul, which TensorRT parses and ONNX Runtime
    itself turns into MatMulNBits (no activation Q/DQ stands in front of it)."""
    from onnx import TensorProto

    from mq_deploy.quant.fakequant import Int4Head, Int8Head

    if isinstance(head, Int4Head):
        q, s = head.qweight.numpy(), head.scale.to(torch.float64).numpy()          # [V, d], [V, blocks]
        if int4_format == "qdq":
            wq = b.int4(np.ascontiguousarray(q.T), "lm_head_q4")
            w = b.op("DequantizeLinear", [wq, b.f32(np.ascontiguousarray(s.T), "lm_head_scale")], "lm_head_dq",
                     axis=0, block_size=head.block)
            return b.op("MatMul", [h, w], "logits")
        packed, scales = nbits_weight(q, s, head.block)
        return b.op("MatMulNBits", [h, b.const(packed, "lm_head_q4"), b.f32(scales, "lm_head_scale")], "logits",
                    domain=MS_DOMAIN, K=head.in_features, N=head.out_features, bits=4, block_size=head.block,
                    accuracy_level=NBITS_ACCURACY[int4_format])
    if not isinstance(head, Int8Head):
        return b.op("MatMul", [h, b.f32(head.weight.t(), "lm_head")], "logits")
    qw = b.const(np.ascontiguousarray(head.qweight.numpy().T), "lm_head_q")      # [d, V] int8
    if head.act == "none":
        w = b.op("DequantizeLinear", [qw, b.f32(head.scale, "lm_head_scale"), b.axis_zero_point(head.out_features)],
                 "lm_head_dq", axis=1)
        return b.op("MatMul", [h, w], "logits")
    hq, hs, hz = b.op("DynamicQuantizeLinear", [h], "head_in_q", n_out=3)
    acc = b.op("MatMulInteger", [hq, qw, hz, b.const(np.zeros(head.out_features, dtype=np.int8), "lm_head_zp")],
               "head_acc")
    acc = b.op("Cast", [acc], "head_acc_f", to=TensorProto.FLOAT)
    return b.op("Mul", [acc, b.op("Mul", [hs, b.f32(head.scale, "lm_head_scale")])], "logits")


def _onnx_type(dtype: str) -> int:
    """The ONNX element type of a state's numpy dtype name (StateSpec.dtype)."""
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _layer_state(g: _Graph, layout, i: int, fused: bool, names: dict, int8_fused: frozenset = frozenset()):
    """What layer i's emitter gets of the step graph's states (families.state_inputs), as float32 tensors
    (`names`: each stored input's float32 form, models.state_codec; the per-row scales stay out): (names of its
    stacked states, its index in them) for a fused step op that reads its layer itself, else (its state
    tensors in its family's order, None): a Gather of each stacked state, or its own per-layer inputs. States
    in `int8_fused` (_int8_fused) go to the fused op as stored, int8, followed by their per-row scales."""
    mine = sorted((si for si in layout if i in si.layers and si.spec.scale_of is None), key=lambda si: si.position)
    if not mine:
        return None
    if fused and all(si.spec.stacked for si in mine):
        scales = ()
        if any(si.name in int8_fused for si in mine):
            rows = {si.spec.scale_of: si.name for si in layout if si.spec.scale_of is not None}
            scales = tuple(rows[si.spec.name] for si in mine if si.spec.name in rows)
        return tuple(names[si.name] for si in mine) + scales, mine[0].layers.index(i)
    return tuple(g.b.op("Gather", [names[si.name], g.b.i64(si.layers.index(i))], axis=0) if si.spec.stacked
                 else names[si.name] for si in mine), None


def _int8_fused(g: _Graph, model, layout) -> frozenset:
    """The stacked int8 states that every layer holding them reads and writes as int8 in its fused step op (the
    family's fused_int8_state(layer config): the op decodes and encodes them itself), so the graph converts
    them neither on the way in nor on the way out."""
    if not g.fused_step or g.quant is None:
        return frozenset()
    cfgs = model.cfg.layer_configs()

    def fused(i):
        impl = family_of(cfgs[i]).module()
        return impl.FUSED_STEP and getattr(impl, "fused_int8_state", lambda cfg: False)(cfgs[i])

    return frozenset(si.name for si in layout if si.spec.scale_of is None and si.spec.stacked
                     and si.spec.dtype == "int8" and si.spec.int8_scale is not None and all(map(fused, si.layers)))


def _decoded_states(g: _Graph, model, layout, int8_fused: frozenset = frozenset()) -> tuple:
    """The step graph's stored state inputs as float32 (models.state_codec.emit_decode): ({input: float32
    tensor}, the static scales of int8 states stored on a quant point's grid: the model's, MambaLM.state_scales).
    The states in int8_fused stay as they are stored (their fused ops decode them)."""
    from mq_deploy.models.state_codec import emit_decode

    scales = getattr(model, "state_scales", {})
    by_state = {si.spec.scale_of: si.name for si in layout if si.spec.scale_of is not None}
    names = {}
    for si in layout:
        if si.spec.scale_of is not None:
            continue
        plain = si.spec.dtype == "float32" or si.spec.int8_scale is None or si.name in int8_fused
        if not plain and not si.spec.stacked:
            raise MQInternalError(f"{si.name}: only a stacked state is stored converted (build_model's outputs)")
        names[si.name] = si.name if plain else emit_decode(g.b, si, by_state.get(si.spec.name), scales)
    return names, scales


def resident(model, name: str):
    """Submodule `name` of `model`, read in first if the model was loaded lazily (loaders.load_model(lazy=True))
    and it is not in memory yet: a streamed export holds one block at a time."""
    module = model.get_submodule(name)
    if getattr(model, "lazy_weights", None) is not None and any(t.is_meta for t in module.parameters()):
        from mq_deploy.models.loaders import materialize

        module = materialize(model, name)
    return module


def _layers(g: _Graph, model, h, layout=None, consume: bool = False, names=None, int8_fused=frozenset()):
    """Residual blocks and the final norm; each mixer is emitted by its family (families/<name>/export.py).
    layout: the step graph's state inputs (families.state_inputs), None for the full graph. consume: each
    block is released from the model once it is in the graph (build_model). int8_fused: _int8_fused's."""
    b = g.b
    new = []
    emb = h          # the embeddings, which a family's own block may read too (emit_block)
    for i in range(len(model.layers)):
        layer = resident(model, f"layers.{i}")
        impl = layer.mixer.family.module()
        st = None if layout is None else _layer_state(g, layout, i, g.fused_step and impl.FUSED_STEP, names,
                                                      int8_fused)
        if getattr(layer, "reads_embeddings", False):
            h, new_st = impl.emit_block(g, layer, mixer_prefix(i), h, emb, st)
            new.append(new_st)
            if consume:
                model.layers[i] = torch.nn.Identity()
            continue
        out, new_st = impl.emit(g, layer.mixer, mixer_prefix(i), b.rms_norm(h, layer.norm), st)
        if layer.residual_multiplier != 1.0:
            out = b.op("Mul", [out, b.f32(np.array(layer.residual_multiplier), "residual_multiplier")])
        h = b.op("Add", [h, out], "residual")
        new.append(new_st)
        if consume:
            model.layers[i] = torch.nn.Identity()
    return b.rms_norm(h, resident(model, "norm_f")), new


def _metadata(model, quant, step, int4_format=None):
    """int4_format: the MatMulNBits form the W4 linears were written in (None: QDQ, the key is left out)."""
    kind = "lm" if isinstance(model, MambaLM) else "vim"
    q = {"recipe": quant.recipe, "wbits": quant.wbits, "abits": quant.abits} if quant else None
    if q and int4_format:
        q["int4_format"] = int4_format
    meta = {"mq.kind": kind, "mq.graph": "step" if step else "full", "mq.config": json.dumps(model.cfg.to_dict()),
            "mq.quant": json.dumps(q) if q else ""}
    if kind == "lm" and model.cfg.vocab_size == 256:
        meta["mq.tokenizer"] = "bytes"
    return meta


def build_model(model, quant: QuantSpec | None = None, step: bool = False, opset: int = OPSET,
                rotation: str = "factored", last_logits: bool = False, small_weights: str = "qdq",
                fused_step: bool = True, consume: bool = False, int4_format: str = "qdq", sink=None,
                int8_state_in_op: bool = True):
    """ModelProto of a MambaLM (input_ids -> logits) or Vim (images -> logits); see the module doc.
    rotation: how the online Hadamard before out_proj runs, "factored" (two small MatMuls) or "dense".
    last_logits (LMs): logits of the last position only, [batch, 1, V] (what generation reads; a
    prefill then skips the vocab matmul of every other position). small_weights: see SMALL_WEIGHTS.
    fused_step (step graphs): each layer's conv, x_proj, dt_proj and scan as one mq::SelectiveStateUpdate
    (state_update_op.py), and each int8 linear and the int8 head as one mq::QLinear / mq::DynamicQLinear
    (qlinear_op.py); False: the same ops unfused, as in the full graph. consume: the model's residual
    blocks are released as they go into the graph, so its float weights and their int8 copies are not all
    held at once (the model cannot run afterwards; export drops it anyway). int4_format (W4 checkpoints): how
    the int4 linears are written, INT4_FORMATS. sink: onnx_file.ExternalSink taking each large tensor as it is
    made; with a lazily loaded model (load_model(lazy=True)) and consume, a block at a time is in memory.
    int8_state_in_op (step graphs of a quantized model storing int8 states, fused_step): each fused step op
    reads and writes its layer's int8 states itself (_int8_fused); False: the graph converts the stacked states
    with nodes around the int8 ops, as export did before those ops (benchmarks and tests compare the two)."""
    from onnx import ModelProto, helper
    from onnx import TensorProto as T

    proto = ModelProto()
    b = _Builder(opset, proto.graph.initializer, sink)
    g = _Graph(b, quant, rotation, small_weights, fused_step, int4_format)
    vi = helper.make_tensor_value_info
    outputs = []
    layer_cfgs = model.cfg.layer_configs()
    if isinstance(model, MambaLM):
        inputs = [vi("input_ids", T.INT64, ["batch", "seq"])]
        layout = None
        if step:
            layout = state_inputs(model.cfg)
            if not layout:
                raise MQUserError("a model without a recurrent state or cache has no decode-step graph")
            inputs += [vi(si.name, _onnx_type(si.spec.dtype), list(si.dims)) for si in layout]
        h = b.op("Gather", [b.f32(resident(model, "embedding").weight, "embedding"), "input_ids"], axis=0)
        if consume and getattr(model, "lazy_weights", None) is not None and not model.cfg.tie_embeddings:
            from mq_deploy.models.loaders import release

            release(model.embedding)
        if model.cfg.embedding_multiplier != 1.0:
            h = b.op("Mul", [h, b.f32(np.array(model.cfg.embedding_multiplier), "embedding_multiplier")])
        int8_fused = _int8_fused(g, model, layout) if step and int8_state_in_op else frozenset()
        names, state_scales = _decoded_states(g, model, layout, int8_fused) if step else (None, {})
        h, new = _layers(g, model, h, layout, consume, names, int8_fused)
        if last_logits:
            h = b.op("Slice", [h, b.i64([-1]), b.i64([np.iinfo(np.int64).max]), b.i64([1])], "last")
        logits = _lm_head(b, h, resident(model, "lm_head"), int4_format)
        if model.cfg.logits_scaling != 1.0:
            logits = b.op("Div", [logits, b.f32(np.array(model.cfg.logits_scaling), "logits_scaling")])
        outputs.append(vi("logits", T.FLOAT, ["batch", 1 if last_logits else "seq", model.cfg.vocab_size]))
        row_scales = {}          # a state's name -> its per-row scales, made when the state is stored
        for si in layout or ():
            if si.spec.scale_of in int8_fused or si.name in int8_fused:     # the layers' ops stored them
                b.op("Concat", [b.op("Unsqueeze", [new[i][si.position], b.i64([0])]) for i in si.layers], axis=0)
            elif si.spec.scale_of is not None:
                b.op("Identity", [row_scales[si.spec.scale_of]])
            elif si.spec.stacked:
                parts = [b.op("Unsqueeze", [new[i][si.position], b.i64([0])]) for i in si.layers]
                value = b.op("Concat", parts, axis=0)
                if names[si.name] != si.name:           # stored other than as the layers compute it
                    from mq_deploy.models.state_codec import emit_encode

                    value, row_scales[si.spec.name] = emit_encode(b, si, value, state_scales)
                    b.op("Identity", [value])
            else:
                b.op("Identity", [new[si.layers[0]][si.position]])
            dims = list(si.dims) if si.spec.stacked else ["total" if d == "past" else d for d in si.dims]
            b.nodes[-1].output[0] = si.output
            outputs.append(vi(si.output, _onnx_type(si.spec.dtype), dims))
    else:
        if step:
            raise MQUserError("a Vision Mamba (bidirectional) has no decode-step graph")
        cfg = model.cfg
        conv = model.patch_embed.proj
        p = b.op("Conv", ["images", b.f32(conv.weight, "patch_w"), b.f32(conv.bias, "patch_b")],
                 kernel_shape=[cfg.patch_size] * 2, strides=[cfg.stride] * 2)
        p = b.op("Transpose", [b.op("Reshape", [p, b.i64([0, cfg.d_model, -1])])], perm=[0, 2, 1])   # [b, M, d]
        pos = model.token_position
        cls = b.op("Expand", [b.f32(model.cls_token, "cls"),
                              b.op("Concat", [b.batch_dim("images"), b.i64([1, cfg.d_model])], axis=0)])
        head = b.op("Slice", [p, b.i64([0]), b.i64([pos]), b.i64([1])])
        tail = b.op("Slice", [p, b.i64([pos]), b.i64([cfg.num_patches]), b.i64([1])])
        h = b.op("Add", [b.op("Concat", [head, cls, tail], axis=1), b.f32(model.pos_embed, "pos_embed")])
        h, _ = _layers(g, model, h, consume=consume)
        feat = b.op("Gather", [h, b.i64(pos)], axis=1)
        logits = b.op("MatMul", [feat, b.f32(model.head.weight.t(), "head")])
        if model.head.bias is not None:
            logits = b.op("Add", [logits, b.f32(model.head.bias, "head_b")])
        inputs = [vi("images", T.FLOAT, ["batch", cfg.in_chans, cfg.img_size, cfg.img_size])]
        outputs.append(vi("logits", T.FLOAT, ["batch", cfg.num_classes]))
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    if step and fused_step:     # the int8 linears (and an int8 head) as one node each (qlinear_op.py)
        b.nodes, _ = qlinear_op.fuse(b.nodes, proto.graph.initializer)
    # the ModelProto is filled in place (what helper.make_graph + make_model would build, without their copies)
    graph = proto.graph
    graph.name = "mq_deploy_" + ("int8" if quant else "fp32")
    graph.node.extend(b.nodes)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    op_types = {n.op_type for n in b.nodes if n.domain == DOMAIN}
    done = set()
    for m in layer_cfgs:          # each family's function bodies once (per distinct block config)
        key = (family_of(m).name, repr(m))
        if key not in done:
            done.add(key)
            for fn in family_of(m).module().functions(m, quant is not None, op_types, opset):
                if all(f.name != fn.name or f.domain != fn.domain for f in proto.functions):
                    proto.functions.append(fn)
    proto.functions.extend(qlinear_op.functions(op_types, opset))
    proto.ir_version = IR_VERSION
    nbits = any(n.domain == MS_DOMAIN for n in b.nodes)
    proto.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    if nbits:
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    proto.producer_name = "mq-deploy"
    for k, v in _metadata(model, quant, step, int4_format if nbits else None).items():
        proto.metadata_props.add(key=k, value=v)
    return proto


def build_fp_model(model):
    """ModelProto of a float32 model (kept for callers of the FP baseline)."""
    return build_model(model)
