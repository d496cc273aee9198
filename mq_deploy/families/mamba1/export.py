"""Mamba1's ONNX emitters: one mixer as graph nodes (the full graph, and the decode step's fused
mq::SelectiveStateUpdate), and the function bodies its ops need. Called by export/graph.py."""

from __future__ import annotations

import numpy as np
import torch

from mq_deploy.export.scan_op import DOMAIN, OP, OP_FLOAT, selective_scan_float_function, selective_scan_function
from mq_deploy.export.state_update_op import OP_UPDATE, OP_UPDATE_FLOAT, OP_UPDATE_INT8_STATE, state_update_function
from mq_deploy.models.points import weight_key


def _scan_constants(b, mixer, s: str = "") -> dict:
    """The scan's float inputs of branch s: A = -exp(A_log), D, the dt bias, the gate's smoothing factor."""
    A = -torch.exp(getattr(mixer, "A_b_log" if s else "A_log").detach().double())
    gate = mixer.gate_scale if mixer.gate_scale is not None else torch.ones(mixer.cfg.d_inner)
    return {"A": b.f32(A, "A"), "D": b.f32(getattr(mixer, "D" + s), "D"),
            "dt_bias": b.f32(getattr(mixer, "dt_proj" + s).bias, "dt_bias"), "gate_scale": b.f32(gate, "gate_scale")}


def _branch(g, mixer, prefix, x, z, s, conv_state=None, ssm_state=None):
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
        norms = ((mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm) if cfg.inner_norm_weights
                 else (None, None, None))       # Jamba: the same norms with weights
        dt_low, Bm, Cm = (b.rms_norm(t, n, cfg.mixer_rms_eps) for t, n in zip((dt_low, Bm, Cm), norms))
    dt_proj = getattr(mixer, "dt_proj" + s)
    dt = g.matmul(g.qdq(dt_low, prefix + "dt_low" + s), weight_key(prefix, "dt_proj", s), dt_proj.weight, small=True)
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


def _fused_branch(g, mixer, prefix, x, z, states, layer: int):
    """The decode-step form of _branch (forward direction): one mq::SelectiveStateUpdate(Float) node
    (state_update_op.py) reading layer `layer` of the stacked states (conv_state, ssm_state). Returns (y,
    new_conv_state, h_last). With int8 states (conv_state, ssm_state, ssm_state_scale as stored: graph.py's
    _int8_fused): mq::SelectiveStateUpdateInt8State, returning (y, conv codes, ssm codes, their row scales)."""
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
        conv_state, ssm_state = states
        ins = [x, z, conv_state, ssm_state, b.f32(conv.weight.reshape(di, k), "conv_w"), conv_b,
               b.f32(x_proj.weight, "x_proj_w"), b.f32(dt_proj.weight.t(), "dt_proj_w")] + tail
        return b.op(OP_UPDATE_FLOAT, ins, "state_update", n_out=3, domain=DOMAIN, **attrs)
    conv_w = g.dequantized(weight_key(prefix, "conv1d"), conv.weight).reshape(di, k)
    qx, sx = g.grid(weight_key(prefix, "x_proj"), x_proj.weight)
    qd, sd = g.grid(weight_key(prefix, "dt_proj"), dt_proj.weight)
    ins = [x, z, states[0], states[1], b.f32(conv_w, "conv_w"), conv_b, b.const(qx.numpy(), "x_proj_q"),
           b.f32(sx, "x_proj_scale"), b.const(np.ascontiguousarray(qd.numpy().T), "dt_proj_q"),
           b.f32(sd, "dt_proj_scale")] + tail + list(states[2:])
    points = {"conv_scale": "conv1d", "x_scale": "x", "dt_low_scale": "dt_low", "delta_scale": "dt",
              "B_scale": "B", "C_scale": "C", "z_scale": "z"}
    attrs.update({a: g._scale(prefix + p) for a, p in points.items()})
    if len(states) == 3:
        return b.op(OP_UPDATE_INT8_STATE, ins, "state_update", n_out=4, domain=DOMAIN, **attrs)
    return b.op(OP_UPDATE, ins, "state_update", n_out=3, domain=DOMAIN, **attrs)


FUSED_STEP = True      # step graphs: one mq::SelectiveStateUpdate node per layer reads its layer of the stacked states


def fused_int8_state(cfg) -> bool:
    """Whether a quantized layer's fused step op reads and writes its states as int8 itself
    (mq::SelectiveStateUpdateInt8State): every fused one (a layer with inner norm weights runs unfused)."""
    return not cfg.inner_norm_weights and not cfg.bimamba


def emit(g, mixer, prefix, h, state=None):
    """One Mamba1 mixer: h (the block norm's output) -> (out_proj output, new states or (None, None)).
    state: None (full graph); in a step graph (stacked state inputs, layer index) when g.fused_step, else
    (this layer's states, None)."""
    b = g.b
    h = g.qdq(h, prefix + "in_proj")
    x, z = b.op("Split", [g.linear(h, mixer.in_proj, weight_key(prefix, "in_proj")), b.i64([mixer.cfg.d_inner] * 2)],
                n_out=2, axis=-1)
    if g.quant is not None:
        z = g.q(z, prefix + "z")             # the scan takes z as int8 straight from its QuantizeLinear
    if state is not None and state[1] is not None and mixer.cfg.inner_norm_weights:
        # the fused state-update op has no norm weights: this layer's states gathered, the unfused ops
        names, layer = state
        state = (tuple(b.op("Gather", [n, b.i64(layer)], axis=0) for n in names), None)
    if state is not None and state[1] is not None:
        names, layer = state
        y, new_conv, h_last, *scales = _fused_branch(g, mixer, prefix, x, z, names, layer)
    else:
        scales = []
        conv_state, ssm_state = state[0] if state is not None else (None, None)
        y, new_conv, h_last = _branch(g, mixer, prefix, x, z, "", conv_state, ssm_state)
    if mixer.cfg.bimamba:
        y_b, _, _ = _branch(g, mixer, prefix, b.flip_time(x), b.flip_time(z), "_b")
        y = b.op("Mul", [b.op("Add", [y, b.flip_time(y_b)]), b.f32(np.array(0.5), "half")])
    if mixer.out_rotation is not None:
        y = g.online_rotation(y, mixer.out_rotation)
    return (g.linear(g.qdq(y, prefix + "out_proj"), mixer.out_proj, weight_key(prefix, "out_proj")),
            (new_conv, h_last, *scales))


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    """The FunctionProtos of the mq:: ops this family's nodes use (`op_types`, the graph's op types)."""
    fns = [selective_scan_function(opset) if quantized else selective_scan_float_function(opset)]
    if op_types & {OP_UPDATE, OP_UPDATE_FLOAT}:
        fns.append(state_update_function(mixer_cfg, quantized, opset))
    if quantized and OP_UPDATE_INT8_STATE in op_types:
        fns.append(state_update_function(mixer_cfg, quantized, opset, int8_state=True))
    return fns
