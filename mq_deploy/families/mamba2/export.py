"""Mamba2's ONNX emitter: one mixer as graph nodes (in_proj, the depthwise conv over x|B|C, the
mq::SSDScan op, the gated RMSNorm, out_proj), and the function bodies its ops need."""

from __future__ import annotations

import torch

from mq_deploy.export.scan_op import DOMAIN
from mq_deploy.export.ssd_op import OP, OP_FLOAT, ssd_scan_float_function, ssd_scan_function
from mq_deploy.export.ssd_state_update_op import (
    OP_UPDATE,
    OP_UPDATE_FLOAT,
    OP_UPDATE_INT8_STATE,
    ssd_state_update_function,
)
from mq_deploy.models.points import weight_key

FUSED_STEP = True      # step graphs: one mq::SSDStateUpdate per layer reads its layer of the stacked states


def _gated_norm(g, mixer, y, z):
    """The gated RMSNorm between the scan and out_proj (families/mamba2/mixer.py GatedRMSNorm)."""
    b, cfg = g.b, mixer.cfg
    gate = b.silu(z)
    if mixer.norm is None:
        return b.op("Mul", [y, gate])
    t = y if cfg.norm_before_gate else b.op("Mul", [y, gate])
    if cfg.norm_groups > 1:
        t = b.op("Reshape", [t, b.i64([0, 0, cfg.norm_groups, cfg.d_inner // cfg.norm_groups])], "norm_groups")
    t = b.rms_norm(t, None, cfg.norm_eps)
    if cfg.norm_groups > 1:
        t = b.op("Reshape", [t, b.i64([0, 0, cfg.d_inner])], "norm_join")
    t = b.op("Mul", [t, b.f32(mixer.norm.weight, "norm_w")])
    return b.op("Mul", [t, gate]) if cfg.norm_before_gate else t


def _scan_attrs(g, cfg, prefix) -> dict:
    attrs = {"heads": cfg.n_heads, "head_dim": cfg.head_dim, "groups": cfg.n_groups, "d_state": cfg.d_state,
             "chunk": cfg.chunk_size, "dt_min": float(cfg.dt_min),
             "dt_max": float("inf") if cfg.dt_max is None else float(cfg.dt_max)}
    if g.quant is not None:
        gn = cfg.n_groups * cfg.d_state
        channels = {"x": cfg.d_inner, "dt": cfg.n_heads, "B": gn, "C": gn}
        attrs.update({f"{n}_scale": g.scales(prefix + n, c) for n, c in channels.items()})
    return attrs


def _fused(g, mixer, prefix, xbc, dt, states, layer: int):
    """The decode-step form: one mq::SSDStateUpdate(Float) node (ssd_state_update_op.py) reading layer
    `layer` of the stacked states (conv_state, ssm_state). Returns (y, new conv state, last ssm state). With
    int8 states (conv_state, ssm_state, ssm_state_scale as stored: graph.py's _int8_fused):
    mq::SSDStateUpdateInt8State, returning (y, conv codes, ssm codes, their row scales)."""
    b, cfg = g.b, mixer.cfg
    conv = mixer.conv1d
    if g.quant is None:
        w = conv.weight.reshape(cfg.conv_dim, cfg.d_conv)
    else:
        w = g.dequantized(weight_key(prefix, "conv1d"), conv.weight).reshape(cfg.conv_dim, cfg.d_conv)
    conv_b = b.f32(conv.bias if conv.bias is not None else torch.zeros(cfg.conv_dim), "conv_b")
    ins = [xbc, g.q(dt, prefix + "dt", cfg.n_heads) if g.quant is not None else dt, *states[:2], b.f32(w, "conv_w"),
           conv_b,
           b.f32(-torch.exp(mixer.A_log.detach().double()), "A"), b.f32(mixer.D, "D"), b.f32(mixer.dt_bias, "dt_bias"),
           *states[2:]]
    attrs = {"layer": int(layer), **_scan_attrs(g, cfg, prefix)}
    if g.quant is not None:
        attrs["conv_scale"] = g._scale(prefix + "conv1d")
    if len(states) == 3:
        return b.op(OP_UPDATE_INT8_STATE, ins, "ssd_update", n_out=4, domain=DOMAIN, **attrs)
    return b.op(OP_UPDATE if g.quant is not None else OP_UPDATE_FLOAT, ins, "ssd_update", n_out=3, domain=DOMAIN,
                **attrs)


def fused_int8_state(cfg) -> bool:
    """Whether a quantized layer's fused step op reads and writes its states as int8 itself
    (mq::SSDStateUpdateInt8State): every one."""
    return True


def emit(g, mixer, prefix, h, state=None, proj=None):
    """One Mamba2 mixer: h (the block norm's output) -> (out_proj output, (new conv state, last ssm state)).
    state: None (full graph); in a step graph (stacked state inputs, layer index) when g.fused_step, else
    (this layer's (conv_state, ssm_state), None). proj: in_proj's output computed by the caller (a parallel
    block's one MatMul), or None."""
    from onnx import TensorProto, helper

    b, cfg = g.b, mixer.cfg
    di, H, P, G, N, K = cfg.d_inner, cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state, cfg.d_conv
    # h itself (not its QDQ) gives the batch below: a second reader of the DequantizeLinear output stops
    # ONNX Runtime fusing in_proj into its int8 MatMul
    if proj is None:
        proj = g.linear(g.qdq(h, prefix + "in_proj"), mixer.in_proj, weight_key(prefix, "in_proj"))
    z, xbc, dt = b.op("Split", [proj, b.i64([di, cfg.conv_dim, H])], n_out=3, axis=-1)
    z = g.qdq(z, prefix + "z")
    if state is not None and state[1] is not None:
        y, *new = _fused(g, mixer, prefix, xbc, dt, state[0], state[1])
        return _finish(g, mixer, prefix, y, z), tuple(new)
    conv_state, ssm_state = state[0] if state is not None else (None, None)
    xt = g.qdq(b.op("Transpose", [xbc], perm=[0, 2, 1]), prefix + "conv1d")        # [b, conv_dim, L]
    new_conv = None
    if conv_state is not None:
        xt = b.op("Concat", [conv_state, xt], axis=2)
        n = b.op("Gather", [b.op("Shape", [xt]), b.i64([2])], axis=0)
        new_conv = b.op("Slice", [xt, b.op("Sub", [n, b.i64([K - 1])]), n, b.i64([2])], "conv_state")
    conv = mixer.conv1d
    w = g.weight(weight_key(prefix, "conv1d"), conv.weight, transpose=False, small=True)
    conv_in = [xt, w] + ([b.f32(conv.bias, "conv_b")] if conv.bias is not None else [])
    xc = b.op("Conv", conv_in, group=cfg.conv_dim, kernel_shape=[K], pads=[0, 0] if conv_state is not None
              else [K - 1, 0])
    xc = b.silu(b.op("Transpose", [xc], perm=[0, 2, 1]))
    x, Bm, Cm = b.op("Split", [xc, b.i64([di, G * N, G * N])], n_out=3, axis=-1)
    if ssm_state is None:
        ssm_state = b.op("ConstantOfShape", [b.op("Concat", [b.batch_dim(h), b.i64([H, P, N])], axis=0)],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    A = b.f32(-torch.exp(mixer.A_log.detach().double()), "A")
    consts = [b.f32(mixer.D, "D"), b.f32(mixer.dt_bias, "dt_bias"), ssm_state]
    attrs = _scan_attrs(g, cfg, prefix)
    if g.quant is None:
        y, h_last = b.op(OP_FLOAT, [x, dt, A, Bm, Cm, *consts], "ssd", n_out=2, domain=DOMAIN, **attrs)
    else:
        q = {n: prefix + n for n in ("x", "dt", "B", "C")}
        ins = [g.q(x, q["x"], di), g.q(dt, q["dt"], H), A, g.q(Bm, q["B"], G * N), g.q(Cm, q["C"], G * N), *consts]
        y, h_last = b.op(OP, ins, "ssd", n_out=2, domain=DOMAIN, **attrs)
    return _finish(g, mixer, prefix, y, z), (new_conv, h_last)


def _finish(g, mixer, prefix, y, z):
    """The gated norm, the online rotation, out_proj."""
    y = _gated_norm(g, mixer, y, z)
    if mixer.out_rotation is not None:
        y = g.online_rotation(y, mixer.out_rotation)
    return g.linear(g.qdq(y, prefix + "out_proj"), mixer.out_proj, weight_key(prefix, "out_proj"))


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    fns = [ssd_scan_function(opset) if quantized else ssd_scan_float_function(opset)]
    if op_types & {OP_UPDATE, OP_UPDATE_FLOAT}:
        fns.append(ssd_state_update_function(mixer_cfg, quantized, opset))
    if quantized and OP_UPDATE_INT8_STATE in op_types:
        fns.append(ssd_state_update_function(mixer_cfg, quantized, opset, int8_state=True))
    return fns


__all__ = ["FUSED_STEP", "emit", "functions", "fused_int8_state"]
