"""PTQ recipes on the same quant points: fp, rtn, smoothquant, quarot, mambaquant.

Each recipe transforms the model in place (float64 folds), calibrates, rounds the weights and
attaches activation fake-quant. Order matters and is fixed per recipe:

  rtn          min-max scales, nothing else
  smoothquant  smoothing at in_proj's input folded into the block norm (the only site whose
               producer is linear in the input; out_proj's producer is the gate, whose fold is
               MambaQuant's contribution and belongs to that recipe)
  quarot       norm fusion, Hadamard rotation of the residual stream and of the low-rank dt between
               x_proj and dt_proj (offline), online Hadamard before out_proj, min-max scales
  mambaquant   norm fusion, KLT-enhanced rotation K·H of the residual stream (K from the float64
               covariance of every in_proj input) and K·H of the low-rank dt (from its own
               covariance), Smooth-Fused rotation before out_proj (smoothing folded into the gate,
               then online Hadamard), B/C smoothing folded into x_proj,
               percentile observers at the heavy-tailed scan and out_proj inputs
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mq_deploy.calib.collect import calibrate, mixers
from mq_deploy.calib.observers import CovarianceObserver, MinMaxObserver, PercentileObserver
from mq_deploy.errors import MQUserError
from mq_deploy.quant.fakequant import QuantConfig, attach_activation_quant, quantize_weights, scales_from_observers
from mq_deploy.transforms import fold
from mq_deploy.transforms.rotations import hadamard_rotation, klt_hadamard_rotation, smoothing_factors

RECIPES = ("fp", "rtn", "smoothquant", "quarot", "mambaquant")
HEAVY_TAILED = ("x", "x_b", "B", "B_b", "C", "C_b", "dt", "dt_b", "out_proj")


@dataclass
class RecipeConfig:
    recipe: str = "mambaquant"
    quant: QuantConfig = field(default_factory=QuantConfig)
    alpha: float = 0.5                  # smoothing migration strength
    percentile: float = 99.99           # mambaquant's observer on heavy-tailed points

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise MQUserError(f"unknown recipe {self.recipe!r} (choose from {', '.join(RECIPES)})")
        if not 0.0 <= self.alpha <= 1.0:
            raise MQUserError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 90.0 <= self.percentile <= 100.0:
            raise MQUserError(f"percentile must be in [90, 100], got {self.percentile}")


def _minmax(name):
    return [MinMaxObserver(name)]


def _finish(model, loop, cfg: RecipeConfig, make_observers) -> dict:
    """Calibrate activation scales on the transformed model, then round weights, then attach act quant.

    Activations are calibrated before weight rounding so every recipe sees the same FP activations.
    """
    act_scales = {}
    if cfg.quant.act_granularity == "per_tensor":
        act_scales = scales_from_observers(calibrate(model, loop, make_observers), cfg.quant.abits)
    w_scales = quantize_weights(model, cfg.quant.wbits)
    attach_activation_quant(model, act_scales, cfg.quant)
    return {"act_scales": act_scales, "weight_scales": w_scales}


def _smooth_in_proj(model, loop, alpha):
    obs = calibrate(model, loop, _minmax)
    for prefix, mixer in mixers(model):
        layer = model.layers[int(prefix.split(".")[1])]
        a = obs[prefix + "in_proj"][0].amax(per_channel=True)
        w = mixer.in_proj.weight.detach().abs().amax(0)
        fold.smooth_norm_into_linear(layer.norm, mixer.in_proj, smoothing_factors(a, w, alpha))


def _residual_covariance(model, loop):
    obs = calibrate(model, loop, lambda name: [CovarianceObserver(name)] if name.endswith(".in_proj") else [])
    return sum(o[0].second_moment() for name, o in obs.items() if o)


def _branches(mixer):
    return ("", "_b") if mixer.cfg.bimamba else ("",)


def _smooth_fused_out_proj_and_bc(model, loop, alpha):
    """Smooth-Fused rotation's smoothing (gate and B/C) and the KLT·H rotation of the low-rank dt.

    One calibration pass serves both: neither smoothing changes the dt path's activations.
    """
    def make(name):
        obs = [MinMaxObserver(name)]
        return obs + [CovarianceObserver(name)] if name.rsplit(".", 1)[1].startswith("dt_low") else obs

    obs = calibrate(model, loop, make)
    for prefix, mixer in mixers(model):
        for branch in _branches(mixer):
            fold.rotate_dt_lowrank(mixer, klt_hadamard_rotation(obs[prefix + "dt_low" + branch][1].second_moment()),
                                   branch)
        a = obs[prefix + "out_proj"][0].amax(per_channel=True)
        w = mixer.out_proj.weight.detach().abs().amax(0)
        fold.smooth_out_proj_into_gate(mixer, smoothing_factors(a, w, alpha))
        for branch in _branches(mixer):
            b = obs[prefix + "B" + branch][0].amax(per_channel=True)
            c = obs[prefix + "C" + branch][0].amax(per_channel=True)
            fold.smooth_scan_bc(mixer, (b.clamp_min(1e-8) / c.clamp_min(1e-8)).sqrt(), branch)


def apply_recipe(model, loop, cfg: RecipeConfig, quantize: bool = True) -> dict:
    """Transform + quantize `model` in place; `loop(model)` runs the calibration data. Returns scales.

    quantize=False stops after the transforms (the model then computes the FP function).
    """
    # every fold computes in float64 and stores back in the model's dtype; calibration runs in that dtype
    if cfg.recipe == "fp":
        return {"act_scales": {}, "weight_scales": {}}
    if cfg.recipe == "smoothquant":
        _smooth_in_proj(model, loop, cfg.alpha)
    if cfg.recipe in ("quarot", "mambaquant"):
        fold.fuse_norms(model)
        if cfg.recipe == "quarot":
            Q = hadamard_rotation(model.cfg.d_model)
        else:
            Q = klt_hadamard_rotation(_residual_covariance(model, loop))
        fold.rotate_residual(model, Q)
        if cfg.recipe == "mambaquant":
            _smooth_fused_out_proj_and_bc(model, loop, cfg.alpha)
        else:
            R = hadamard_rotation(model.cfg.mixer.dt_rank)
            for _, mixer in mixers(model):
                for branch in _branches(mixer):
                    fold.rotate_dt_lowrank(mixer, R, branch)
        H = hadamard_rotation(model.cfg.mixer.d_inner)
        for _, mixer in mixers(model):
            fold.set_online_out_rotation(mixer, H)
    if not quantize:
        return {"act_scales": {}, "weight_scales": {}}
    if cfg.recipe == "mambaquant" and cfg.percentile < 100:   # percentile 100 is exactly min-max
        def make(name):
            point = name.rsplit(".", 1)[1]
            return [PercentileObserver(name, cfg.percentile)] if point in HEAVY_TAILED else [MinMaxObserver(name)]
    else:
        make = _minmax
    return _finish(model, loop, cfg, make)
