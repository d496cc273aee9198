"""PTQ recipes on the same quant points, found through a registry (torchao-style).

A recipe is one function registered with `@register_recipe(name, observers=SPEC)`: it applies the
recipe's output-preserving transforms to the model in place (float64 folds, calibration passes of
its own where it needs statistics). Everything after that is shared and recipe-independent:

  calibrate_activations  one pass over the calibration data with the observers of the spec (the
                         recipe's default `observers`, or RecipeConfig.observer), plus the GPTQ
                         Hessians when asked
  quantize_calibrated    activation scales for the bit width, weights rounded (RTN or GPTQ) on the
                         per-channel grid, activation fake-quant attached

so one transform + calibration serves every bit width (`compare` uses that). `apply_recipe` only looks
the recipe up. Adding a recipe = writing one function; the CLI lists `recipe_names()`.

Importing this module is torch-free (the CLI builds its choices from the registry); the handlers
import the heavy modules when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mq_deploy.calib.spec import PERCENTILE_DEFAULT, ObserverSpec
from mq_deploy.errors import MQUserError

WEIGHT_ROUNDING = ("rtn", "gptq")
KLT_SOURCES = ("sum", "last")


@dataclass(frozen=True)
class Recipe:
    name: str
    transform: Callable            # transform(model, loop, cfg) -> None, in place, output-preserving
    observers: str                 # the default --observer spec of the recipe
    quantized: bool = True         # False: "fp", nothing is rounded
    summary: str = ""
    # a layer-wise recipe (register_recipe(layerwise=True)) is transform split in parts a layer-streamed quantize
    # (quant.streamed) runs with one layer in memory at a time; transform runs them in order on a whole model:
    fuses_norms: bool = False      # first, every RMSNorm weight into its readers (fold.fuse_norms)
    stats: Callable | None = None  # stats(model, loop, cfg) -> ctx: the passes over every layer it needs first
    ends: Callable | None = None   # ends(model, ctx): what it does to the embedding and the head
    layers: Callable | None = None  # layers(model, loop, cfg, ctx): what it does to each layer in memory

    @property
    def layerwise(self) -> bool:
        return self.layers is not None


_REGISTRY: dict = {}


def register_recipe(name: str, *, observers: str = "minmax", quantized: bool = True, layerwise: bool = False,
                    fuses_norms: bool = False, stats: Callable | None = None, ends: Callable | None = None):
    """Decorator: register `fn(model, loop, cfg)` as recipe `name`, calibrated with `observers` by default.
    layerwise: fn is the per-layer part, `fn(model, loop, cfg, ctx)` on the layers in memory (collect.mixers),
    with the optional fuses_norms / stats / ends parts of Recipe; such a recipe also runs layer-streamed."""
    ObserverSpec.parse(observers)   # a bad default is our bug: fail at import time

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"recipe {name!r} is already registered")
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        if not layerwise:
            _REGISTRY[name] = Recipe(name, fn, observers, quantized, summary)
            return fn

        def transform(model, loop, cfg):
            if fuses_norms:
                from mq_deploy.transforms import fold

                fold.fuse_norms(model)
            ctx = stats(model, loop, cfg) if stats is not None else None
            if ends is not None:
                ends(model, ctx)
            fn(model, loop, cfg, ctx)
        _REGISTRY[name] = Recipe(name, transform, observers, quantized, summary, fuses_norms, stats, ends, fn)
        return fn
    return deco


def recipe_names() -> tuple:
    return tuple(_REGISTRY)


def get_recipe(name: str) -> Recipe:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MQUserError(f"unknown recipe {name!r} (choose from {', '.join(_REGISTRY)})") from None


def _default_quant():
    from mq_deploy.quant.fakequant import QuantConfig

    return QuantConfig()


@dataclass
class RecipeConfig:
    recipe: str = "mambaquant"
    quant: object = field(default_factory=_default_quant)     # fakequant.QuantConfig
    alpha: float = 0.5                  # smoothing migration strength
    percentile: float = PERCENTILE_DEFAULT   # the P of a `percentile` observer given without one
    observer: str | None = None         # --observer spec; None: the recipe's default (resolved on creation)
    weight_rounding: str = "rtn"        # rtn | gptq
    klt_source: str = "last"            # mambaquant's residual K: "last": the last layer's in_proj input second
                                        # moment (the authors' placement), or "sum" over every layer; "last" was
                                        # chosen on held-out calibration data (bench/choose_defaults.py)

    def __post_init__(self):
        get_recipe(self.recipe)
        if not 0.0 <= self.alpha <= 1.0:
            raise MQUserError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 90.0 <= self.percentile <= 100.0:
            raise MQUserError(f"percentile must be in [90, 100], got {self.percentile}")
        # resolved here, so a quantized checkpoint's manifest names the observers it was calibrated with
        self.observer = str(ObserverSpec.parse(self.observer or get_recipe(self.recipe).observers))
        if self.weight_rounding not in WEIGHT_ROUNDING:
            raise MQUserError(f"--weight-rounding must be one of {', '.join(WEIGHT_ROUNDING)}, "
                              f"got {self.weight_rounding!r}")
        if self.klt_source not in KLT_SOURCES:
            raise MQUserError(f"klt_source must be one of {', '.join(KLT_SOURCES)}, got {self.klt_source!r}")

    def observer_spec(self) -> ObserverSpec:
        return ObserverSpec.parse(self.observer)


# -- shared helpers of the recipes ------------------------------------------------------------------

def _minmax(name):
    from mq_deploy.calib.observers import MinMaxObserver

    return [MinMaxObserver(name)]


def _layer_mixers(model):
    from mq_deploy.calib.collect import mixers

    return mixers(model)


def torch_max(tensors):
    """The elementwise max of same-shaped tensors."""
    out = None
    for t in tensors:
        out = t if out is None else out.maximum(t)
    return out


def _point_of(name: str) -> tuple:
    """("layers.3.mixer.", "x_b") of a full quant point name."""
    prefix, _, point = name.rpartition(".")
    return prefix + ".", point


# -- the recipes -------------------------------------------------------------------------------------

@register_recipe("fp", quantized=False, layerwise=True)
def fp(model, loop, cfg, ctx):
    """the floating-point model, untouched"""


@register_recipe("rtn", layerwise=True)
def rtn(model, loop, cfg, ctx):
    """round to nearest: min-max scales, no transform"""


@register_recipe("smoothquant", layerwise=True)
def smoothquant(model, loop, cfg, ctx):
    """SmoothQuant at every block's input (in_proj's; q/k/v's; up/gate's), folded into the block norm

    The only site whose producer is linear in the input; out_proj's producer is the gate, whose fold
    is MambaQuant's contribution and belongs to that recipe.
    """
    from mq_deploy.calib.collect import calibrate
    from mq_deploy.transforms import fold
    from mq_deploy.transforms.rotations import smoothing_factors

    obs = calibrate(model, loop, _minmax)
    for prefix, mixer in _layer_mixers(model):
        layer = model.layers[int(prefix.split(".")[1])]
        readers = mixer.readers()
        a = obs[prefix + mixer.family.input_point][0].amax(per_channel=True)
        w = torch_max(lin.weight.detach().abs().amax(0) for lin in readers)
        fold.smooth_norm_into_linear(layer.norm, readers, smoothing_factors(a, w, cfg.alpha))


def _hadamard_residual(model, loop, cfg):
    from mq_deploy.transforms.rotations import hadamard_rotation

    return hadamard_rotation(model.cfg.d_model)


def _rotate_ends(model, R):
    from mq_deploy.transforms import fold

    fold.rotate_ends(model, R)


@register_recipe("quarot", layerwise=True, fuses_norms=True, stats=_hadamard_residual, ends=_rotate_ends)
def quarot(model, loop, cfg, R):
    """QuaRot: Hadamard residual and low-rank-dt rotations (offline), online Hadamard before out_proj"""
    from mq_deploy.transforms import fold

    fold.rotate_layers(model, R)
    for _, mixer in _layer_mixers(model):
        mixer.family.module().quarot_fold(mixer)     # the family's own rotations (Mamba1: the low-rank dt)
    _online_out_hadamard(model)


def _online_out_hadamard(model):
    from mq_deploy.transforms import fold
    from mq_deploy.transforms.rotations import hadamard_rotation

    shared = {}                                                       # one buffer per size, for every layer
    for _, mixer in _layer_mixers(model):
        if mixer.out_linear is None:          # a block with no output projection to rotate before
            continue
        n = mixer.out_linear.in_features
        if n not in shared:
            H = hadamard_rotation(n).double()
            shared[n] = (H, H.to(mixer.out_linear.weight.dtype))
        fold.set_online_out_rotation(mixer, shared[n][0], runtime=shared[n][1])


def residual_second_moment(model, loop, source: str = "sum"):
    """E[x x^T] of every block's input (the normalised residual stream: a family's input_point, in_proj's
    input for the Mamba mixers): summed over every layer, or the last layer's alone."""
    from mq_deploy.calib.collect import calibrate
    from mq_deploy.calib.observers import CovarianceObserver
    from mq_deploy.models.points import mixer_prefix

    # every layer's name, in memory or not: a layer-streamed model reads its layers in as the loop runs
    inputs = {mixer_prefix(i) + layer.mixer.family.input_point for i, layer in enumerate(model.layers)}
    last = f"layers.{len(model.layers) - 1}.mixer.{model.layers[-1].mixer.family.input_point}"

    def make(name):
        want = name in inputs and (source == "sum" or name == last)
        return [CovarianceObserver(name)] if want else []

    obs = calibrate(model, loop, make)
    return sum(o[0].second_moment() for o in obs.values() if o)


def _family_folds(model, loop, cfg):
    """Each mixer's MambaQuant folds (families/<name>/folds.py), from one calibration pass of the model in
    which every mixer's family chooses the observers of its own points."""
    from mq_deploy.calib.collect import calibrate

    impls = {prefix: mixer.family.module() for prefix, mixer in _layer_mixers(model)}

    def make(name):
        prefix, point = _point_of(name)
        return impls[prefix].mambaquant_observers(point)

    obs = calibrate(model, loop, make)
    for prefix, mixer in _layer_mixers(model):
        impls[prefix].mambaquant_fold(mixer, prefix, obs, cfg)


def _klt_residual(model, loop, cfg):
    from mq_deploy.transforms.rotations import klt_hadamard_rotation

    return klt_hadamard_rotation(residual_second_moment(model, loop, cfg.klt_source))


@register_recipe("mambaquant", observers="minmax,heavy=percentile", layerwise=True, fuses_norms=True,
                 stats=_klt_residual, ends=_rotate_ends)
def mambaquant(model, loop, cfg, R):
    """MambaQuant: KLT·H residual rotation, the family's KLT·H / Smooth-Fused folds, online Hadamard before out_proj

    K comes from the float64 second moment of the in_proj inputs (cfg.klt_source: the last layer's, or
    all layers summed). Each family then folds its own sites from one calibration pass (Mamba1: KLT·H of
    the low-rank dt, the out_proj smoothing into the gate z·sigmoid(s·z), B/C smoothing into x_proj), and
    the online Hadamard goes before out_proj. Observers: percentile (MambaQuant's 99.9999 by
    default) on the heavy-tailed scan and out_proj inputs, min-max elsewhere. Both defaults (observers,
    KLT placement) were chosen on held-out calibration data, never the evaluation set
    (bench/choose_defaults.py, docs/results.md). Layer-wise: the residual rotation R is the one thing
    that needs every layer first (stats); the rest is each layer's own.
    """
    from mq_deploy.transforms import fold

    fold.rotate_layers(model, R)
    _family_folds(model, loop, cfg)
    _online_out_hadamard(model)


# -- calibration and rounding, shared by every recipe ----------------------------------------------

@dataclass
class Calibrated:
    """What one calibration pass of a transformed model leaves: observers per point, GPTQ Hessians."""
    observers: dict
    hessians: dict
    spec: ObserverSpec
    samples: int = 0
    kv_amax: dict = field(default_factory=dict)    # attention block -> largest |key|, |value| per head [2, heads]


def _consumer_weights(model) -> dict:
    """{quant point: weight of the op that reads it} for the `mse-out` observer (scan-only points absent)."""
    out = {}
    for prefix, mixer in _layer_mixers(model):
        for point, site in mixer.family.consumers.items():
            mod = getattr(mixer, site, None)
            if mod is not None:
                out[prefix + point] = mod.weight
    return out


def make_observer(name: str, choice, percentile: float, consumers: dict):
    from mq_deploy.calib import observers as O

    if choice.kind == "minmax":
        return O.MinMaxObserver(name)
    if choice.kind == "percentile":
        return O.PercentileObserver(name, choice.percentile if choice.percentile is not None else percentile)
    if choice.kind == "entropy":
        return O.EntropyObserver(name)
    if choice.kind == "mse-out" and name in consumers:
        return O.OutputMSEObserver(name, consumers[name])
    return O.MSEObserver(name)        # mse, and mse-out at a point only the scan reads


def calibrate_activations(model, loop, cfg: RecipeConfig, hessians: bool | None = None) -> Calibrated:
    """One calibration pass of the transformed model: the spec's observer at every point, and the
    input second moments of the GPTQ linears when `hessians` (default: cfg.weight_rounding == "gptq")."""
    from mq_deploy.calib.collect import calibrate
    from mq_deploy.calib.observers import CovarianceObserver

    spec = cfg.observer_spec()
    hessians = cfg.weight_rounding == "gptq" if hessians is None else hessians
    consumers = _consumer_weights(model) if "mse-out" in spec.kinds() else {}
    gptq_points = {prefix: set(mixer.family.gptq_inputs.values()) for prefix, mixer in _layer_mixers(model)}
    groups = {}                               # per-group scales (QuantConfig.ssm_scales "grouped")
    if cfg.quant.ssm_scales == "grouped":
        groups = {prefix: (mixer.family, mixer.cfg) for prefix, mixer in _layer_mixers(model)}
    per_tensor = cfg.quant.act_granularity == "per_tensor"
    if not per_tensor and not hessians and cfg.quant.kv_cache == "fp32":
        return Calibrated({}, {}, spec)

    def make(name):
        from mq_deploy.calib.observers import GroupedObserver

        prefix, point = _point_of(name)
        choice = spec.choice_for(point)
        n_groups = groups[prefix][0].scale_groups(groups[prefix][1], point) if prefix in groups else 1
        obs = []
        if per_tensor and n_groups > 1:
            obs = [GroupedObserver(name, n_groups, lambda n: make_observer(n, choice, cfg.percentile, {}))]
        elif per_tensor:
            obs = [make_observer(name, choice, cfg.percentile, consumers)]
        if hessians and point in gptq_points[prefix]:
            obs.append(CovarianceObserver(name))
        return obs

    from mq_deploy.families.attention import kv

    with kv.observe(model) as kv_amax:      # the KV caches' per-head ranges (cheap: one max per head)
        obs = calibrate(model, loop, make)
    H = {name: next(o for o in lst if isinstance(o, CovarianceObserver)).second_moment()
         for name, lst in obs.items() if any(isinstance(o, CovarianceObserver) for o in lst)}
    acts = {name: lst[0] for name, lst in obs.items() if per_tensor}
    return Calibrated(acts, H, spec, getattr(loop, "samples", 0), kv_amax)


def activation_scales(cal: Calibrated, bits: int) -> dict:
    from mq_deploy.ops.quant import scale_from_amax

    return {name: scale_from_amax(obs.amax(bits), bits) for name, obs in cal.observers.items()}


def quantize_calibrated(model, cal: Calibrated, quant, weight_rounding: str = "rtn") -> dict:
    """Scales for quant.abits, weights rounded to quant.wbits (RTN or GPTQ), activation fake-quant attached.

    Activations were calibrated before any weight rounding, so every recipe sees the same FP activations.
    """
    from mq_deploy.quant.fakequant import attach_activation_quant, quantize_weights

    act_scales = activation_scales(cal, quant.abits) if quant.act_granularity == "per_tensor" else {}
    if weight_rounding == "gptq":
        from mq_deploy.quant.gptq import gptq_weights

        if not cal.hessians:
            raise MQUserError("GPTQ weight rounding needs the calibration Hessians (calibrate with hessians=True)")
        w_scales = gptq_weights(model, cal.hessians, quant.wbits)
    else:
        w_scales = quantize_weights(model, quant.wbits)
    attach_activation_quant(model, act_scales, quant)
    if quant.kv_cache == "int8":
        from mq_deploy.families.attention import kv

        # (a layer-streamed model's window may hold no attention layer; quantize checked the model has one)
        if kv.attention_modules(model) or getattr(model, "stream_window", None) is None:
            kv.set_int8(model, cal.kv_amax)
    return {"act_scales": act_scales, "weight_scales": w_scales}


def apply_recipe(model, loop, cfg: RecipeConfig, quantize: bool = True) -> dict:
    """Transform + quantize `model` in place; `loop(model)` runs the calibration data. Returns scales.

    quantize=False stops after the transforms (the model then computes the FP function).
    """
    recipe = get_recipe(cfg.recipe)
    recipe.transform(model, loop, cfg)
    if not quantize or not recipe.quantized:
        return {"act_scales": {}, "weight_scales": {}}
    return quantize_calibrated(model, calibrate_activations(model, loop, cfg), cfg.quant, cfg.weight_rounding)


RECIPES = recipe_names()      # the built-in recipes, in registration order

__all__ = ["Calibrated", "KLT_SOURCES", "RECIPES", "Recipe", "RecipeConfig", "WEIGHT_ROUNDING",
           "activation_scales", "apply_recipe", "calibrate_activations", "get_recipe", "quantize_calibrated",
           "recipe_names", "register_recipe", "residual_second_moment"]
