"""Model families as plug-ins: each mixer kind (Mamba1, Mamba2, ...) is declared once, here, and every
other stage asks its declaration instead of naming a parameter.

A family folder (`mq_deploy/families/<name>/`) registers, in its torch-free `__init__.py`:
- its mixer config (a validated dataclass; `kind` in a config dict says which family reads it);
- its quant points (one list: calibration, fake quant, GPTQ, inspect, the exporter and the
  `--observer` syntax all read it), the heavy-tailed ones, its quantized weight sites and the point
  each one reads (GPTQ, mse-out), and the points `inspect` plots;
- its decode state (names and per-layer shapes: what step graphs take and runtimes allocate);
- its verify tolerances;
- the checkpoint formats it reads (HF model types, mamba-ssm `ssm_cfg.layer` values, files);
- `impl`: the module with the torch side, imported only when needed: the `Mixer` module, the fold
  hooks per recipe (`quarot_fold`, `mambaquant_hook`), the ONNX emitters (`emit`, `functions`), the
  runtime buffers of a quantized checkpoint, and the checkpoint loaders.

Importing this package is torch-free, so the CLI can list families and validate point names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from mq_deploy.errors import MQUserError


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state of a mixer, `shape` one layer's for one sequence. Stacked (an SSM's fixed-size
    state): the step graph has one input `name` [layers of the family, batch, *shape] and one output
    `name`_out. Not stacked (an attention layer's KV cache, whose `shape` holds None for its growing
    length): one input `name`_LAYER [batch, *shape] per layer and one output `output`_LAYER. `dtype`: its
    element type in numpy's spelling, the same in PyTorch, the graph and every runtime ("int8": an attention
    cache stored quantized, AttentionConfig.kv_cache).

    `int8_scale`: how an SSM state is stored when the model's state_dtype (MambaLMConfig, `export
    --state-dtype`) asks for int8: "rows" (a float16 scale per row of its last axis, carried as the state
    `name`_scale: the scale follows the state as it grows and decays), or "point:P" (on the static scale of
    the layer's quant point P: the conv state, whose values already lie on the conv1d point's grid). None: the
    state is not an SSM state and keeps its dtype whatever state_dtype says (a KV cache; `--kv-cache`).
    `scale_of`: this spec is the per-row scale of that int8 state (stored_states adds it)."""
    name: str
    shape: tuple
    stacked: bool = True
    output: str | None = None
    dtype: str = "float32"
    int8_scale: str | None = None
    scale_of: str | None = None

    @property
    def output_name(self) -> str:
        return self.output or self.name + "_out"


@dataclass(frozen=True)
class StateInput:
    """One state input of a step graph (state_inputs): its name, the output that carries it on, its
    dimensions ("batch", and "past" for a cache's growing length), the layers it holds and its spec."""
    name: str
    output: str
    dims: tuple
    layers: tuple
    spec: StateSpec
    position: int            # the spec's place in the layer's stored_states (the state tuple of MambaLM's layer)


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout a family reads. `loader` is "module:function", function(path) returning
    (model, config, extra); the other fields tell detection which folders are this format's."""
    name: str                                 # LoadedModel.format, e.g. "hf-mamba"
    family: str
    loader: str
    hf_model_types: tuple = ()                # config.json model_type values
    hf_architectures: tuple = ()              # config.json architectures entries
    ssm_layers: tuple = ()                    # mamba-ssm config.json ssm_cfg.layer values
    not_streamable: str = ""                  # why load_model(lazy=True) cannot read it layer by layer, if so

    @property
    def streamable(self) -> bool:
        return not self.not_streamable

    def load(self, path: str):
        module, fn = self.loader.split(":")
        return getattr(importlib.import_module(module), fn)(path)


@dataclass(frozen=True, eq=False)
class Family:
    name: str                                 # the `kind` a mixer config dict carries
    config: type                              # the mixer config dataclass
    impl: str                                 # module of the torch side (see the package doc)
    points: tuple                             # activation quant points of one mixer (one scan direction)
    heavy_tailed: tuple                       # those calibrated with the percentile observer by mambaquant
    weight_sites: tuple                       # quantized weights: module names inside the mixer
    gptq_inputs: dict                         # weight site -> the quant point that is its input
    consumers: dict                           # quant point -> the weight site that reads it (mse-out)
    inspect: tuple                            # (point, its consumer site) plotted by `inspect`
    states: Callable                          # states(config) -> [StateSpec] (empty: no decode step)
    tolerances: dict = field(default_factory=dict)   # verify's defaults for this family's artifacts
    branch_points: tuple = ()                 # points a second scan direction repeats with suffix "_b"
    branch_sites: tuple = ()                  # weight sites the second direction repeats
    has_branch: Callable = staticmethod(lambda cfg: False)   # has_branch(config): the "_b" direction exists
    formats: tuple = ()                       # CheckpointFormats
    input_point: str = "in_proj"              # the point that sees the block norm's output (MambaQuant's KLT source)
    describe: Callable = staticmethod(lambda cfg: "")   # describe(config): its shape in one line (`info`)
    # scale_groups(config, point): equal groups of channels that get a scale each when activations are
    # quantized with QuantConfig.ssm_scales "grouped" (per head, per SSD group); 1: per tensor
    scale_groups: Callable = staticmethod(lambda cfg, point: 1)

    def module(self):
        return importlib.import_module(self.impl)

    def point_names(self, cfg) -> tuple:
        """Every quant point of one mixer of config `cfg`, both directions."""
        return self.points + (tuple(p + "_b" for p in self.branch_points) if self.has_branch(cfg) else ())

    def site_names(self, cfg) -> tuple:
        """Every quantized weight site of one mixer of config `cfg` (a site's "_b" twin right after it)."""
        b = self.has_branch(cfg)
        return tuple(n for s in self.weight_sites for n in ((s, s + "_b") if b and s in self.branch_sites else (s,)))


_FAMILIES: dict = {}
_FORMATS: list = []         # checkpoint formats of models built from several families (hybrids)
_BUILTIN = ("mamba1", "mamba2", "attention", "mlp", "nemotron_h", "granite_h", "bamba", "parallel",
            "falcon_h1", "moe", "jamba", "zamba2")
_loaded = False


def register_family(fam: Family) -> Family:
    if fam.name in _FAMILIES:
        raise ValueError(f"family {fam.name!r} is already registered")
    for f in fam.formats:
        if f.family != fam.name:
            raise ValueError(f"format {f.name} declares family {f.family!r}, registered under {fam.name!r}")
    _FAMILIES[fam.name] = fam
    return fam


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """A checkpoint format whose models mix families (a hybrid's HF model type)."""
    if any(f.name == fmt.name for f in _FORMATS):
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS.append(fmt)
    return fmt


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in _BUILTIN:
            importlib.import_module(f"mq_deploy.families.{name}")
        # the built-ins in _BUILTIN's order whichever was imported first (the CLI imports attention's config
        # early), then any other: listings, help and point order do not depend on import order
        order = {n: i for i, n in enumerate(_BUILTIN)}
        items = sorted(_FAMILIES.items(), key=lambda kv: order.get(kv[0], len(order)))
        _FAMILIES.clear()
        _FAMILIES.update(items)


def families() -> tuple:
    _load_builtin()
    return tuple(_FAMILIES.values())


def get_family(name) -> Family:
    _load_builtin()
    fam = _FAMILIES.get(name) if isinstance(name, str) else None
    if fam is None:
        raise MQUserError(f"unsupported mixer kind {name!r} (supported: {', '.join(_FAMILIES)})")
    return fam


def family_of(cfg) -> Family:
    """The family of a mixer config object (or of a model config's mixer)."""
    _load_builtin()
    cfg = getattr(cfg, "mixer", cfg)
    for fam in _FAMILIES.values():
        if isinstance(cfg, fam.config):
            return fam
    raise MQUserError(f"no registered family takes a {type(cfg).__name__}")


def mixer_config_from_dict(d):
    """A mixer config from its dict (a config file's `mixer`): `kind` names the family (Mamba1 when absent,
    as every file written before families existed)."""
    if not isinstance(d, dict):
        raise MQUserError(f"mixer must be an object, got {d!r}")
    d = dict(d)
    fam = get_family(d.pop("kind", "mamba1"))
    try:
        return fam.config(**d)
    except TypeError as e:       # an unknown or missing field
        raise MQUserError(f"invalid {fam.name} mixer config ({e})") from None


def all_points() -> tuple:
    """Every base quant point name of every family (the `--observer` syntax validates against these)."""
    seen = []
    for fam in families():
        for p in fam.points:
            if p not in seen:
                seen.append(p)
    return tuple(seen)


def heavy_tailed_points() -> tuple:
    seen = []
    for fam in families():
        for p in fam.heavy_tailed:
            if p not in seen:
                seen.append(p)
    return tuple(seen)


def stored_states(model_cfg, layer_cfg) -> list:
    """The states of one layer of a causal model as a step graph stores them between calls: its family's
    states (families.<name>.states), SSM states in model_cfg.state_dtype (StateSpec.int8_scale says how
    int8 holds each), then the per-row scale of each int8 state stored with one (`scale_of`). The one place
    the stored form is decided: state_inputs, MambaLM's states and models.state_codec read it."""
    import dataclasses

    dtype = getattr(model_cfg, "state_dtype", "float32")
    specs = list(family_of(layer_cfg).states(layer_cfg))
    if dtype == "float32":
        return specs
    out, scales = [], []
    for spec in specs:
        if spec.int8_scale is None:
            out.append(spec)
            continue
        out.append(dataclasses.replace(spec, dtype=dtype))
        if dtype == "int8" and spec.int8_scale == "rows":
            from mq_deploy.models.state_codec import SCALE_DTYPE

            scales.append(StateSpec(spec.name + "_scale", tuple(spec.shape[:-1]), spec.stacked,
                                    None if spec.output is None else spec.output + "_scale", SCALE_DTYPE,
                                    scale_of=spec.name))
    return out + scales


def state_inputs(model_cfg) -> list:
    """The step graph's state inputs of a causal model config, in graph order: each stacked spec once for
    the layers of its family (first layers first), then each per-layer spec per layer. The one place the
    layout of decode states is decided: export, runners, verify and the PyTorch reference read it."""
    layers = model_cfg.layer_configs()
    stacked, per_layer, seen = {}, [], {}
    for i, cfg in enumerate(layers):
        fam = family_of(cfg)
        for pos, spec in enumerate(stored_states(model_cfg, cfg)):
            if spec.stacked:
                key = spec.name
                if key in stacked and seen[key] != (fam.name, tuple(spec.shape)):
                    raise MQUserError(f"layers {stacked[key][0]} and {i}: two kinds of {spec.name} "
                                      f"({seen[key]} and {(fam.name, tuple(spec.shape))}) cannot share a stacked state")
                seen[key] = (fam.name, tuple(spec.shape))
                stacked.setdefault(key, ([], spec, pos))[0].append(i)
            else:
                dims = ("batch",) + tuple("past" if d is None else d for d in spec.shape)
                per_layer.append(StateInput(f"{spec.name}_{i}", f"{spec.output_name}_{i}", dims, (i,), spec, pos))
    out = [StateInput(name, spec.output_name, (len(idx), "batch", *spec.shape), tuple(idx), spec, pos)
           for name, (idx, spec, pos) in stacked.items()]
    return out + per_layer


def zero_states(model_cfg, batch: int, cache_slots: int = 0) -> dict:
    """{input: zeros of its spec's dtype} of a fresh sequence's states in the step graph's layout (state_inputs):
    an SSM's state all zeros, a KV cache `cache_slots` long (0; 1 for a Triton repository's copy, whose caches carry the
    one slot Triton's implicit state starts a variable-size state with, never attended)."""
    import numpy as np

    return {si.name: np.zeros([batch if d == "batch" else cache_slots if d == "past" else d for d in si.dims],
                              si.spec.dtype)
            for si in state_inputs(model_cfg)}


def checkpoint_formats() -> tuple:
    return tuple(f for fam in families() for f in fam.formats) + tuple(_FORMATS)


__all__ = ["CheckpointFormat", "Family", "StateInput", "StateSpec", "all_points", "checkpoint_formats", "families",
           "family_of", "get_family", "heavy_tailed_points", "mixer_config_from_dict", "register_family",
           "register_format", "state_inputs", "stored_states"]
