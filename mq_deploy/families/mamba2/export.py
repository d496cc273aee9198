"""Mamba2's ONNX emitter: one mixer as graph nodes (in_proj, the depthwise conv over x|B|C, the
mq::SSDScan op, the gated RMSNorm, out_proj), and the function bodies its ops need."""

from __future__ import annotations

import torch

from mq_deploy.export.scan_op import DOMAIN
from mq_deploy.export.ssd_op import OP, OP_FLOAT, ssd_scan_float_function, ssd_scan_function
from mq_deploy.models.points import weight_key

FUSED_STEP = False     # step graphs: the conv-state shift, conv and mq::SSDScan per layer, as in the full graph


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


def emit(g, mixer, prefix, h, state=None):
    """One Mamba2 mixer: h (the block norm's output) -> (out_proj output, (new conv state, last ssm state)).
    state: None (full graph) or (this layer's (conv_state, ssm_state), None) in a step graph."""
    from onnx import TensorProto, helper

    b, cfg = g.b, mixer.cfg
    di, H, P, G, N, K = cfg.d_inner, cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state, cfg.d_conv
    conv_state, ssm_state = state[0] if state is not None else (None, None)
    h = g.qdq(h, prefix + "in_proj")
    z, xbc, dt = b.op("Split", [g.linear(h, mixer.in_proj, weight_key(prefix, "in_proj")),
                                b.i64([di, cfg.conv_dim, H])], n_out=3, axis=-1)
    z = g.qdq(z, prefix + "z")
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
    attrs = {"heads": H, "head_dim": P, "groups": G, "d_state": N, "chunk": cfg.chunk_size,
             "dt_min": float(cfg.dt_min), "dt_max": float("inf") if cfg.dt_max is None else float(cfg.dt_max)}
    if g.quant is None:
        y, h_last = b.op(OP_FLOAT, [x, dt, A, Bm, Cm, *consts], "ssd", n_out=2, domain=DOMAIN, **attrs)
    else:
        pts = {n: prefix + n for n in ("x", "dt", "B", "C")}
        ins = [g.q(x, pts["x"]), g.q(dt, pts["dt"]), A, g.q(Bm, pts["B"]), g.q(Cm, pts["C"]), *consts]
        attrs.update({f"{n}_scale": [g._scale(p)] for n, p in pts.items()})
        y, h_last = b.op(OP, ins, "ssd", n_out=2, domain=DOMAIN, **attrs)
    y = _gated_norm(g, mixer, y, z)
    if mixer.out_rotation is not None:
        y = g.online_rotation(y, mixer.out_rotation)
    out = g.linear(g.qdq(y, prefix + "out_proj"), mixer.out_proj, weight_key(prefix, "out_proj"))
    return out, (new_conv, h_last)


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    return [ssd_scan_function(opset) if quantized else ssd_scan_float_function(opset)]


__all__ = ["FUSED_STEP", "emit", "functions"]
