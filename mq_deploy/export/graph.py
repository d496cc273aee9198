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
from mq_deploy.export.scan_op import DOMAIN, OP, OP_FLOAT, selective_scan_float_function, selective_scan_function
from mq_deploy.export.state_update_op import OP_UPDATE, OP_UPDATE_FLOAT, state_update_function
from mq_deploy.models.mamba import MambaLM
from mq_deploy.models.points import mixer_prefix, weight_key

OPSET = 21
IR_VERSION = 10          # what ONNX Runtime >= 1.18 loads


@dataclass
class QuantSpec:
    """What the exporter needs from a quantized checkpoint."""
    wbits: int
    abits: int
    act_scales: dict = field(default_factory=dict)       # quant point -> float scale
    weight_scales: dict = field(default_factory=dict)    # parameter name -> per-channel scale tensor
    recipe: str = ""

    def __post_init__(self):
        if self.wbits not in (4, 8):
            raise MQUserError(f"export supports W8 and W4 weights, not W{self.wbits}")
        if self.abits != 8:
            raise MQUserError(f"export supports 8-bit activations (the int8 scan), not A{self.abits}; "
                              "quantize with --abits 8")


class _Builder:
    """Collects nodes and initializers with unique names; identical constants are stored once."""

    def __init__(self, opset, inits=None):
        """inits: the repeated initializer field of the ModelProto being built (each tensor is made in place:
        collecting them in a list and passing it to make_graph / make_model would copy every weight twice)."""
        from onnx import ModelProto

        self.nodes, self._n, self._consts = [], 0, {}
        self.inits = inits if inits is not None else ModelProto().graph.initializer
        self.opset = opset

    def name(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def _intern(self, kind, array, hint, make):
        """The initializer name of `array` (stored as `kind`), made once by make(name)."""
        key = (kind, array.shape, hashlib.sha1(memoryview(array).cast("B")).hexdigest())   # no copy of the bytes
        if key not in self._consts:
            name = self.name(hint)
            self.inits.add().CopyFrom(make(name))   # one tensor's copy at a time, freed at once
            self._consts[key] = name
        return self._consts[key]

    def const(self, array, hint="c"):
        from onnx import numpy_helper

        array = np.asarray(array, order="C")   # no copy if C-contiguous (ascontiguousarray would make a scalar 1-D)
        return self._intern(array.dtype.str, array, hint, lambda name: numpy_helper.from_array(array, name))

    def int4(self, q: np.ndarray, hint):
        from onnx import TensorProto, helper

        q = np.array(q, dtype=np.int8, order="C")
        return self._intern("int4", q, hint,
                            lambda name: helper.make_tensor(name, TensorProto.INT4, q.shape, q.ravel().tolist()))

    def f32(self, t, hint):
        # float64 -> float32 rounds as numpy's astype would; float32 / bf16 / fp16 convert exactly. Never via a
        # float64 copy: a vocabulary-sized embedding would take 2x its float32 size for nothing.
        if torch.is_tensor(t):
            return self.const(t.detach().to(torch.float32).contiguous().numpy(), hint)
        return self.const(np.asarray(t).astype(np.float32), hint)

    def op(self, op_type, inputs, hint=None, n_out=1, domain=None, **attrs):
        from onnx import helper

        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def i64(self, values, hint="i"):
        return self.const(np.asarray(values, dtype=np.int64), hint)

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
                 fused_step: bool = True):
        if small_weights not in SMALL_WEIGHTS:
            raise MQUserError(f"small_weights must be one of {', '.join(SMALL_WEIGHTS)}, got {small_weights!r}")
        self.b, self.quant, self.rotation, self.small_weights = b, quant, rotation, small_weights
        self.fused_step = fused_step

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
        if transpose:
            q = q.t()
        qn = (b.int4(q.numpy(), "wq") if self.quant.wbits == 4 else b.const(q.numpy(), "wq"))
        return b.op("DequantizeLinear", [qn, b.f32(s64, "w_scale")], "w_dq", axis=1 if transpose else 0)

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

    def linear(self, x, lin, name, small=False):
        y = self.b.op("MatMul", [x, self.weight(name, lin.weight, transpose=True, small=small)])
        return self.b.op("Add", [y, self.b.f32(lin.bias, "bias")]) if lin.bias is not None else y

    # -- activations ---------------------------------------------------------------------------------
    def _scale(self, point):
        s = self.quant.act_scales.get(point)
        if s is None:
            raise MQUserError(f"the quantized checkpoint has no activation scale for {point}")
        return float(s)

    def q(self, x, point):
        """int8 QuantizeLinear of x at a quant point."""
        b = self.b
        return b.op("QuantizeLinear", [x, b.f32(np.array(self._scale(point)), "a_scale"),
                                       b.const(np.array(0, dtype=np.int8), "zp")], "q")

    def dq(self, q, point):
        b = self.b
        return b.op("DequantizeLinear", [q, b.f32(np.array(self._scale(point)), "a_scale"),
                                         b.const(np.array(0, dtype=np.int8), "zp")], "dq")

    def qdq(self, x, point):
        return x if self.quant is None else self.dq(self.q(x, point), point)


def _scan_constants(b: _Builder, mixer, s: str = "") -> dict:
    """The scan's float inputs of branch s: A = -exp(A_log), D, the dt bias, the gate's smoothing factor."""
    A = -torch.exp(getattr(mixer, "A_b_log" if s else "A_log").detach().double())
    gate = mixer.gate_scale if mixer.gate_scale is not None else torch.ones(mixer.cfg.d_inner)
    return {"A": b.f32(A, "A"), "D": b.f32(getattr(mixer, "D" + s), "D"),
            "dt_bias": b.f32(getattr(mixer, "dt_proj" + s).bias, "dt_bias"), "gate_scale": b.f32(gate, "gate_scale")}


def _branch(g: _Graph, mixer, prefix, x, z, s, conv_state=None, ssm_state=None):
    """conv -> silu -> x_proj -> dt_proj -> scan of one direction. x float [b, L, Di]; z float or int8.

    Returns (y, new_conv_state or None, h_last)."""
    from onnx import TensorProto, helper

    b, cfg = g.b, mixer.cfg
    conv = getattr(mixer, "conv1d" + s)
    k = cfg.d_conv
    xt = g.qdq(b.op("Transpose", [x], perm=[0, 2, 1]), prefix + "conv1d" + s)        # [b, Di, L]
    new_conv = None
    if conv_state is not None:
        xt = b.op("Concat", [conv_state, xt], axis=2)                                 # [b, Di, K-1+L]
        n = b.op("Gather", [b.op("Shape", [xt]), b.i64([2])], axis=0)
        new_conv = b.op("Slice", [xt, b.op("Sub", [n, b.i64([k - 1])]), n, b.i64([2])], "conv_state")
    w = g.weight(weight_key(prefix, "conv1d", s), conv.weight, transpose=False, small=True)
    conv_in = [xt, w] + ([b.f32(conv.bias, "conv_b")] if conv.bias is not None else [])
    xc = b.op("Conv", conv_in, group=cfg.d_inner, kernel_shape=[k], pads=[0, 0] if conv_state is not None
              else [k - 1, 0])
    xc = b.silu(b.op("Transpose", [xc], perm=[0, 2, 1]))
    if g.quant is not None:
        x_q = g.q(xc, prefix + "x" + s)
        xc = g.dq(x_q, prefix + "x" + s)
    x_dbc = g.linear(xc, getattr(mixer, "x_proj" + s), weight_key(prefix, "x_proj", s), small=True)
    dt_low, Bm, Cm = b.op("Split", [x_dbc,
                                    b.i64([cfg.dt_rank, cfg.d_state, cfg.d_state])], n_out=3, axis=-1)
    if cfg.mixer_rms_eps is not None:     # FalconMamba: weightless RMSNorm on dt, B, C (before their quant points)
        dt_low, Bm, Cm = (b.rms_norm(t, None, cfg.mixer_rms_eps) for t in (dt_low, Bm, Cm))
    dt_proj = getattr(mixer, "dt_proj" + s)
    dt = b.op("MatMul", [g.qdq(dt_low, prefix + "dt_low" + s),
                         g.weight(weight_key(prefix, "dt_proj", s), dt_proj.weight, transpose=True, small=True)])
    if ssm_state is None:   # zero initial state [batch, Di, N] from the runtime batch size
        ssm_state = b.op("ConstantOfShape", [b.op("Concat", [b.batch_dim(x), b.i64([cfg.d_inner, cfg.d_state])],
                                                  axis=0)],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    c = _scan_constants(b, mixer, s)
    params = [c["A"], c["D"], c["dt_bias"], c["gate_scale"]]
    if g.quant is None:
        ins = [xc, dt, params[0], Bm, Cm, params[1], z, params[2], params[3], ssm_state]
        y, h_last = b.op(OP_FLOAT, ins, "scan", n_out=2, domain=DOMAIN)
        return y, new_conv, h_last
    pts = {n: prefix + n + s for n in ("x", "dt", "B", "C")}
    pts["z"] = prefix + "z"
    ins = [x_q, g.q(dt, pts["dt"]), params[0], g.q(Bm, pts["B"]), g.q(Cm, pts["C"]), params[1], z, params[2],
           params[3], ssm_state]
    attrs = {f"{n}_scale": g._scale(p) for n, p in (("x", pts["x"]), ("delta", pts["dt"]), ("B", pts["B"]),
                                                     ("C", pts["C"]), ("z", pts["z"]))}
    y, h_last = b.op(OP, ins, "scan", n_out=2, domain=DOMAIN, **attrs)
    return y, new_conv, h_last


def _fused_branch(g: _Graph, mixer, prefix, x, z, conv_state, ssm_state, layer: int):
    """The decode-step form of _branch (forward direction): one mq::SelectiveStateUpdate(Float) node
    (state_update_op.py) reading layer `layer` of the stacked states. Returns (y, new_conv_state, h_last)."""
    b, cfg = g.b, mixer.cfg
    conv, x_proj, dt_proj = mixer.conv1d, mixer.x_proj, mixer.dt_proj
    di, k = cfg.d_inner, cfg.d_conv
    conv_b = b.f32(conv.bias if conv.bias is not None else torch.zeros(di), "conv_b")
    c = _scan_constants(b, mixer)
    tail = [c["dt_bias"], c["A"], c["D"], c["gate_scale"]]
    attrs = {"layer": int(layer)}
    if cfg.mixer_rms_eps is not None:
        attrs["norm_eps"] = float(cfg.mixer_rms_eps)
    if g.quant is None:
        ins = [x, z, conv_state, ssm_state, b.f32(conv.weight.reshape(di, k), "conv_w"), conv_b,
               b.f32(x_proj.weight, "x_proj_w"), b.f32(dt_proj.weight.t(), "dt_proj_w")] + tail
        return b.op(OP_UPDATE_FLOAT, ins, "state_update", n_out=3, domain=DOMAIN, **attrs)
    conv_w = g.dequantized(weight_key(prefix, "conv1d"), conv.weight).reshape(di, k)
    qx, sx = g.grid(weight_key(prefix, "x_proj"), x_proj.weight)
    qd, sd = g.grid(weight_key(prefix, "dt_proj"), dt_proj.weight)
    ins = [x, z, conv_state, ssm_state, b.f32(conv_w, "conv_w"), conv_b, b.const(qx.numpy(), "x_proj_q"),
           b.f32(sx, "x_proj_scale"), b.const(np.ascontiguousarray(qd.numpy().T), "dt_proj_q"),
           b.f32(sd, "dt_proj_scale")] + tail
    points = {"conv_scale": "conv1d", "x_scale": "x", "dt_low_scale": "dt_low", "delta_scale": "dt",
              "B_scale": "B", "C_scale": "C", "z_scale": "z"}
    attrs.update({a: g._scale(prefix + p) for a, p in points.items()})
    return b.op(OP_UPDATE, ins, "state_update", n_out=3, domain=DOMAIN, **attrs)


ROTATIONS = ("factored", "dense")
# "qdq": every quantized weight as int8/int4 + DequantizeLinear (what TensorRT fuses). "float": conv1d,
# x_proj and dt_proj as their dequantized float32 values. In ORT 1.32 none of those three becomes an
# integer kernel (x_proj's int8 input also feeds the scan op; the conv has a float input), so their
# DequantizeLinear ran on every call: 28 % of a mamba-130m W8A8 decode step in the profile.
SMALL_WEIGHTS = ("qdq", "float")


def hadamard_factors(R) -> tuple | None:
    """(P, Q), with R = P kron Q, P a Sylvester matrix of size a and Q a Hadamard of size n / a (both
    normalised), when R is the normalised Hadamard matrix of its size (as the recipes' online rotation
    is), with a + n / a smallest; else None. Checked elementwise against R (float32 tolerance)."""
    from mq_deploy.ops.hadamard import hadamard_matrix, has_hadamard

    R = R.detach().double().numpy() if torch.is_tensor(R) else np.asarray(R, dtype=np.float64)
    n = R.shape[0]
    if R.ndim != 2 or R.shape[1] != n or n < 4 or not has_hadamard(n):
        return None
    if np.abs(R - hadamard_matrix(n)).max() > 1e-6 / np.sqrt(n):
        return None
    cands = [a for a in (2 ** k for k in range(1, n.bit_length())) if n % a == 0 and has_hadamard(n // a)]
    for a in sorted(cands, key=lambda a: a + n // a):
        P, Q = hadamard_matrix(a), hadamard_matrix(n // a)
        if np.abs(np.kron(P, Q) - R).max() <= 1e-6 / np.sqrt(n):
            return P, Q
    return None


def _online_rotation(b: _Builder, y, R, mode="factored"):
    """y @ R. A Kronecker-structured R = P kron Q (the Hadamard) runs as y -> [.., a, q], Y Q, P^T (Y Q),
    back to [.., n]: n (a + q) MACs per row instead of n^2 (mamba-130m: 1536 = 32 x 48, 123k vs 2.4M).
    Anything else, or mode "dense", is one MatMul with R."""
    if mode not in ROTATIONS:
        raise MQUserError(f"rotation must be one of {', '.join(ROTATIONS)}, got {mode!r}")
    f = hadamard_factors(R) if mode == "factored" else None
    if f is None:
        return b.op("MatMul", [y, b.f32(R, "out_rot")])
    P, Q = f
    a, q = P.shape[0], Q.shape[0]
    y4 = b.op("Reshape", [y, b.i64([0, 0, a, q])], "rot_split")
    yq = b.op("MatMul", [y4, b.f32(Q, "out_rot_q")])
    ypq = b.op("MatMul", [b.f32(P.T, "out_rot_pt"), yq])
    return b.op("Reshape", [ypq, b.i64([0, 0, a * q])], "rot_join")


def _mixer(g: _Graph, mixer, prefix, h, state=None):
    b = g.b
    h = g.qdq(h, prefix + "in_proj")
    x, z = b.op("Split", [g.linear(h, mixer.in_proj, weight_key(prefix, "in_proj")), b.i64([mixer.cfg.d_inner] * 2)],
                n_out=2, axis=-1)
    if g.quant is not None:
        z = g.q(z, prefix + "z")             # the scan takes z as int8 straight from its QuantizeLinear
    if state is not None and g.fused_step and not mixer.cfg.bimamba:
        (conv_state, ssm_state), layer = state
        y, new_conv, h_last = _fused_branch(g, mixer, prefix, x, z, conv_state, ssm_state, layer)
    else:
        conv_state, ssm_state = state if state is not None else (None, None)
        y, new_conv, h_last = _branch(g, mixer, prefix, x, z, "", conv_state, ssm_state)
    if mixer.cfg.bimamba:
        y_b, _, _ = _branch(g, mixer, prefix, b.flip_time(x), b.flip_time(z), "_b")
        y = b.op("Mul", [b.op("Add", [y, b.flip_time(y_b)]), b.f32(np.array(0.5), "half")])
    if mixer.out_rotation is not None:
        y = _online_rotation(b, y, mixer.out_rotation, g.rotation)
    return g.linear(g.qdq(y, prefix + "out_proj"), mixer.out_proj, weight_key(prefix, "out_proj")), (new_conv, h_last)


def _lm_head(b: _Builder, h, head):
    """float MatMul; or, for a quantize_head'ed model (fakequant.Int8Head), int8 per-channel weights with
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) (activations per tensor at
    run time, uint8), or DequantizeLinear -> MatMul (act "none")."""
    from onnx import TensorProto

    from mq_deploy.quant.fakequant import Int8Head

    if not isinstance(head, Int8Head):
        return b.op("MatMul", [h, b.f32(head.weight.t(), "lm_head")], "logits")
    qw = b.const(np.ascontiguousarray(head.qweight.numpy().T), "lm_head_q")      # [d, V] int8
    if head.act == "none":
        w = b.op("DequantizeLinear", [qw, b.f32(head.scale, "lm_head_scale")], "lm_head_dq", axis=1)
        return b.op("MatMul", [h, w], "logits")
    hq, hs, hz = b.op("DynamicQuantizeLinear", [h], "head_in_q", n_out=3)
    acc = b.op("MatMulInteger", [hq, qw, hz, b.const(np.zeros(head.out_features, dtype=np.int8), "lm_head_zp")],
               "head_acc")
    acc = b.op("Cast", [acc], "head_acc_f", to=TensorProto.FLOAT)
    return b.op("Mul", [acc, b.op("Mul", [hs, b.f32(head.scale, "lm_head_scale")])], "logits")


def _layers(g: _Graph, model, h, states=None, consume: bool = False):
    """Residual blocks and the final norm. states: (conv_state, ssm_state) graph inputs stacked over layers.
    consume: each block is released from the model once it is in the graph (build_model)."""
    b = g.b
    new = []
    for i, layer in enumerate(model.layers):
        st = None
        if states is not None and g.fused_step and not layer.mixer.cfg.bimamba:
            st = (states, i)        # the fused op reads its layer of the stacked states itself
        elif states is not None:
            st = tuple(b.op("Gather", [s, b.i64(i)], axis=0) for s in states)
        out, new_st = _mixer(g, layer.mixer, mixer_prefix(i), b.rms_norm(h, layer.norm), st)
        h = b.op("Add", [h, out], "residual")
        new.append(new_st)
        if consume:
            model.layers[i] = torch.nn.Identity()
    return b.rms_norm(h, model.norm_f), new


def _metadata(model, quant, step):
    kind = "lm" if isinstance(model, MambaLM) else "vim"
    meta = {"mq.kind": kind, "mq.graph": "step" if step else "full", "mq.config": json.dumps(model.cfg.to_dict()),
            "mq.quant": json.dumps({"recipe": quant.recipe, "wbits": quant.wbits, "abits": quant.abits})
            if quant else ""}
    if kind == "lm" and model.cfg.vocab_size == 256:
        meta["mq.tokenizer"] = "bytes"
    return meta


def build_model(model, quant: QuantSpec | None = None, step: bool = False, opset: int = OPSET,
                rotation: str = "factored", last_logits: bool = False, small_weights: str = "qdq",
                fused_step: bool = True, consume: bool = False):
    """ModelProto of a MambaLM (input_ids -> logits) or Vim (images -> logits); see the module doc.
    rotation: how the online Hadamard before out_proj runs, "factored" (two small MatMuls) or "dense".
    last_logits (LMs): logits of the last position only, [batch, 1, V] (what generation reads; a
    prefill then skips the vocab matmul of every other position). small_weights: see SMALL_WEIGHTS.
    fused_step (step graphs): each layer's conv, x_proj, dt_proj and scan as one mq::SelectiveStateUpdate
    (state_update_op.py); False: the same ops unfused, as in the full graph. consume: the model's residual
    blocks are released as they go into the graph, so its float weights and their int8 copies are not all
    held at once (the model cannot run afterwards; export drops it anyway)."""
    from onnx import ModelProto, helper
    from onnx import TensorProto as T

    proto = ModelProto()
    b = _Builder(opset, proto.graph.initializer)
    g = _Graph(b, quant, rotation, small_weights, fused_step)
    vi = helper.make_tensor_value_info
    outputs = []
    if isinstance(model, MambaLM):
        m = model.cfg.mixer
        inputs = [vi("input_ids", T.INT64, ["batch", "seq"])]
        states = None
        if step:
            inputs += [vi("conv_state", T.FLOAT, [model.cfg.n_layer, "batch", m.d_inner, m.d_conv - 1]),
                       vi("ssm_state", T.FLOAT, [model.cfg.n_layer, "batch", m.d_inner, m.d_state])]
            states = ("conv_state", "ssm_state")
        h = b.op("Gather", [b.f32(model.embedding.weight, "embedding"), "input_ids"], axis=0)
        h, new = _layers(g, model, h, states, consume)
        if last_logits:
            h = b.op("Slice", [h, b.i64([-1]), b.i64([np.iinfo(np.int64).max]), b.i64([1])], "last")
        logits = _lm_head(b, h, model.lm_head)
        outputs.append(vi("logits", T.FLOAT, ["batch", 1 if last_logits else "seq", model.cfg.vocab_size]))
        if step:
            for j, (name, shape) in enumerate((("conv_state_out", [m.d_inner, m.d_conv - 1]),
                                               ("ssm_state_out", [m.d_inner, m.d_state]))):
                parts = [b.op("Unsqueeze", [st[j], b.i64([0])]) for st in new]
                b.op("Concat", parts, axis=0)
                b.nodes[-1].output[0] = name
                outputs.append(vi(name, T.FLOAT, [model.cfg.n_layer, "batch"] + shape))
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
    # the ModelProto is filled in place (what helper.make_graph + make_model would build, without their copies)
    graph = proto.graph
    graph.name = "mq_deploy_" + ("int8" if quant else "fp32")
    graph.node.extend(b.nodes)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    fns = [selective_scan_function(opset) if quant else selective_scan_float_function(opset)]
    if any(n.op_type in (OP_UPDATE, OP_UPDATE_FLOAT) for n in b.nodes):
        fns.append(state_update_function(model.cfg.mixer, quant is not None, opset))
    proto.functions.extend(fns)
    proto.ir_version = IR_VERSION
    proto.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    proto.producer_name = "mq-deploy"
    for k, v in _metadata(model, quant, step).items():
        proto.metadata_props.add(key=k, value=v)
    return proto


def build_fp_model(model):
    """ModelProto of a float32 model (kept for callers of the FP baseline)."""
    return build_model(model)
