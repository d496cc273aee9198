"""Mamba2's folds and its hooks into the recipes (see families/mamba1/folds.py for the hook contract).

QuaRot and MambaQuant's residual rotation and the online Hadamard before out_proj are the recipes' own
(every family shares them). What is Mamba2's:
- QuaRot: nothing more (there is no low-rank dt link to rotate);
- MambaQuant's Smooth-Fused rotation before out_proj: out_proj's input is the gated norm's output
  w * norm(y * silu(z)) (or w * norm(y) * silu(z)), linear in the norm weight w, so the smoothing factor s
  folds into w (w / s) and out_proj's columns (W * s) exactly, with no runtime op. Without the norm
  (rmsnorm false) there is no weight to fold into and the site is left as it is.
- B and C cannot be smoothed against each other: they pass the depthwise conv and SiLU after in_proj, and
  SiLU does not commute with a per-channel scale. Their outliers are handled by their scales instead
  (per SSD group, quant/fakequant's ssm granularity).
"""

from __future__ import annotations

from mq_deploy.transforms.fold import assign, f64


def smooth_out_proj_into_norm(mixer, s) -> None:
    """out_proj's input divided by s per channel (norm weight w / s), out_proj's columns multiplied by s."""
    if mixer.norm is None:
        return
    if mixer.out_rotation is not None:
        from mq_deploy.errors import MQUserError

        raise MQUserError("smooth before setting the online out_proj rotation (smooth, then rotate)")
    s = f64(s)
    assign(mixer.norm.weight, f64(mixer.norm.weight) / s)
    assign(mixer.out_proj.weight, f64(mixer.out_proj.weight) * s)


def quarot_fold(mixer) -> None:
    """Nothing beyond the shared residual rotation and online Hadamard."""


def mambaquant_observers(point: str) -> list:
    from mq_deploy.calib.observers import MinMaxObserver

    return [MinMaxObserver(point)] if point == "out_proj" else []


def mambaquant_fold(mixer, prefix: str, obs: dict, cfg) -> None:
    from mq_deploy.transforms.rotations import smoothing_factors

    if mixer.norm is None:
        return
    a = obs[prefix + "out_proj"][0].amax(per_channel=True)
    w = mixer.out_proj.weight.detach().abs().amax(0)
    smooth_out_proj_into_norm(mixer, smoothing_factors(a, w, cfg.alpha))


def quant_flags(mixer) -> dict:
    return {}


def add_runtime_buffers(mixer, quant: dict) -> None:
    """A quantized Mamba2 checkpoint holds no buffers beyond its parameters (the smoothing is in the norm)."""
