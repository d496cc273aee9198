"""Mamba1's folds, one small function per site in float64, and its hooks into the recipes.

The recipes (quant/recipes.py) do what every family shares (norm fusion, the residual rotation, the online
Hadamard before out_proj); a family adds what touches its own parameters:
- `quarot_fold(mixer)`: QuaRot's rotation of the low-rank dt (x_proj -> dt_proj);
- `mambaquant_observers(point)` and `mambaquant_fold(mixer, prefix, observers, cfg)`: one calibration pass
  of the whole model (every family's observers together), then MambaQuant's per-mixer folds: the KLT·H
  rotation of the low-rank dt, the Smooth-Fused smoothing of out_proj's input into the gate, and the B/C
  smoothing in x_proj's rows;
- `add_runtime_buffers(mixer, quant)` / `quant_flags(mixer)`: the buffers a quantized checkpoint records.
"""

from __future__ import annotations

import torch

from mq_deploy.errors import MQUserError
from mq_deploy.transforms.fold import assign, f64, fuse_norm_into_linear, rotate_linear_input


def _branches(mixer):
    return ("", "_b") if mixer.cfg.bimamba else ("",)


def rotate_dt_lowrank(mixer, R, branch: str = "") -> None:
    """Rotate the low-rank dt between x_proj and dt_proj (a purely linear link): dt_low -> dt_low R.

    x_proj's first dt_rank output rows become R^T W, dt_proj's input columns W R.
    """
    R = f64(R)
    r = mixer.cfg.dt_rank
    x_proj, dt_proj = getattr(mixer, "x_proj" + branch), getattr(mixer, "dt_proj" + branch)
    if mixer.cfg.inner_norm_weights:
        # Jamba's weighted dt norm: its weight into dt_proj's columns first (the weightless norm commutes with R)
        fuse_norm_into_linear(mixer.dt_layernorm, [dt_proj])
    w = f64(x_proj.weight)
    w[:r] = R.t() @ w[:r]
    assign(x_proj.weight, w)
    rotate_linear_input(dt_proj, R)


def smooth_out_proj_into_gate(mixer, s) -> None:
    """Smooth out_proj's input y by 1/s per channel (W_out <- W_out diag(s)), folded into the gate.

    y = scan(...) * silu(z). Dividing z's rows of in_proj by s gives z' = z / s, and the gate
    z' * sigmoid(s z') = silu(z) / s, so the mixer computes y / s with no extra runtime op.
    """
    s = f64(s)
    di = mixer.cfg.d_inner
    w = f64(mixer.in_proj.weight)
    w[di:] /= s[:, None]
    assign(mixer.in_proj.weight, w)
    if mixer.in_proj.bias is not None:
        b = f64(mixer.in_proj.bias)
        b[di:] /= s
        assign(mixer.in_proj.bias, b)
    w_out = f64(mixer.out_proj.weight)
    if mixer.out_rotation is not None:
        raise MQUserError("smooth before setting the online out_proj rotation (smooth, then rotate)")
    assign(mixer.out_proj.weight, w_out * s)
    prev = mixer.gate_scale
    mixer.register_buffer("gate_scale", (s if prev is None else f64(prev) * s).to(mixer.out_proj.weight.dtype))


def smooth_scan_bc(mixer, s, branch: str = "") -> None:
    """Scale the scan's state matmuls per state n: B <- B / s, C <- C * s (rows of x_proj).

    The state becomes h_n / s_n and the readout C_n s_n h_n / s_n is unchanged.
    """
    s = f64(s)
    cfg = mixer.cfg
    if cfg.inner_norm_weights:      # B, C = weight * norm(x_proj rows): scale the norms' weights
        assign(mixer.b_layernorm.weight, f64(mixer.b_layernorm.weight) / s)
        assign(mixer.c_layernorm.weight, f64(mixer.c_layernorm.weight) * s)
        return
    x_proj = getattr(mixer, "x_proj" + branch)
    w = f64(x_proj.weight)
    r, n = cfg.dt_rank, cfg.d_state
    w[r:r + n] /= s[:, None]
    w[r + n:r + 2 * n] *= s[:, None]
    assign(x_proj.weight, w)


def quarot_fold(mixer) -> None:
    """QuaRot: a Hadamard rotation of the low-rank dt of every scan direction."""
    from mq_deploy.transforms.rotations import hadamard_rotation

    R = hadamard_rotation(mixer.cfg.dt_rank)
    for branch in _branches(mixer):
        rotate_dt_lowrank(mixer, R, branch)


def mambaquant_observers(point: str) -> list:
    """What mambaquant_fold needs to see at `point` (a base name with its branch suffix): its range
    everywhere, and the second moment of the low-rank dt (the KLT of that link)."""
    from mq_deploy.calib.observers import CovarianceObserver, MinMaxObserver

    obs = [MinMaxObserver(point)]
    return obs + [CovarianceObserver(point)] if point.startswith("dt_low") else obs


def mambaquant_fold(mixer, prefix: str, obs: dict, cfg) -> None:
    """Smooth-Fused rotation's smoothing (gate and B/C) and the KLT·H rotation of the low-rank dt, from
    one calibration pass (neither smoothing changes the dt path's activations)."""
    from mq_deploy.transforms.rotations import klt_hadamard_rotation, smoothing_factors

    for branch in _branches(mixer):
        rotate_dt_lowrank(mixer, klt_hadamard_rotation(obs[prefix + "dt_low" + branch][1].second_moment()), branch)
    a = obs[prefix + "out_proj"][0].amax(per_channel=True)
    w = mixer.out_proj.weight.detach().abs().amax(0)
    smooth_out_proj_into_gate(mixer, smoothing_factors(a, w, cfg.alpha))
    # FalconMamba normalises B and C (weightless RMSNorm) after x_proj: a per-channel factor folded into
    # x_proj's rows would change the norm's denominator, so the output would not be preserved. The B/C
    # smoothing is skipped there (the normed B, C have unit RMS per token, the outlier it targets is smaller).
    # Jamba's B and C norms have weights: the factors fold into those weights, after the norm.
    for branch in _branches(mixer) if mixer.cfg.mixer_rms_eps is None or mixer.cfg.inner_norm_weights else ():
        b = obs[prefix + "B" + branch][0].amax(per_channel=True)
        c = obs[prefix + "C" + branch][0].amax(per_channel=True)
        smooth_scan_bc(mixer, (b.clamp_min(1e-8) / c.clamp_min(1e-8)).sqrt(), branch)


def quant_flags(mixer) -> dict:
    """What a quantized checkpoint's config records about this mixer's runtime buffers."""
    return {"gate_scale": mixer.gate_scale is not None}


def add_runtime_buffers(mixer, quant: dict) -> None:
    """The buffers a quantized checkpoint's weights file holds beside the parameters (shapes only)."""
    if quant.get("gate_scale"):
        mixer.register_buffer("gate_scale", torch.zeros(mixer.cfg.d_inner))
