"""Validated model configs. Library functions take these, never argparse namespaces."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mq_deploy.errors import MQUserError

# Upper bounds of config fields, checked before anything is allocated (a config is read back from
# files we did not write: a d_inner of 1e9 must be one clear line, not a 4 TiB allocation attempt). They
# are far above every released model (mamba-2.8b: d_model 2560, 64 layers; Jamba: 72 layers; vocab 256k).
MAX_WIDTH = 1 << 17          # d_model, d_inner, dt_rank, heads x head_dim
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 22
MAX_STATE = 1024             # d_state
MAX_CONV = 64                # d_conv
MAX_CLASSES = 1 << 20
MAX_IMAGE = 8192             # img_size in pixels
MAX_CHANNELS = 64


def check_int(obj, name: str, lo: int = 1, hi: int = MAX_WIDTH) -> None:
    """An integer field (a JSON true is not 1) within [lo, hi]."""
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise MQUserError(f"{type(obj).__name__}.{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise MQUserError(f"{type(obj).__name__}.{name} must be in [{lo}, {hi}], got {v}")


def check_bool(obj, *names) -> None:
    """A boolean field must be a boolean: the string "false" is truthy, so it would silently mean true."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, bool):
            raise MQUserError(f"{type(obj).__name__}.{name} must be true or false (a JSON boolean), got {v!r}")


def check_positive_float(obj, *names):
    """eps-like fields: a finite number > 0 (a negative eps makes rsqrt of a negative mean square: NaN)."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise MQUserError(f"{type(obj).__name__}.{name} must be a finite number > 0, got {v!r}")


# the element types a decode-step graph can store SSM states in (MambaLMConfig.state_dtype), numpy's spelling
STATE_DTYPES = ("float32", "float16", "int8")


@dataclass
class MambaLMConfig:
    d_model: int
    n_layer: int
    vocab_size: int
    mixer: object = None                # a registered family's mixer config (or its dict), in every layer
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    eos_token_id: int | None = None     # generation stops here (from the HF config or the tokenizer)
    # a hybrid (Nemotron-H, ...): one block config per layer, of any registered family (then `mixer` is None)
    layers: list | None = None
    # muP scalars (Granite-4.0-H): embeddings * embedding_multiplier, each block's output * residual_multiplier
    # before the residual add, logits / logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # how a decode-step graph stores the SSM states between calls (export --state-dtype; families.stored_states):
    # "float32", "float16", or "int8" (the conv state on its conv1d scale, the SSM state with a scale per row)
    state_dtype: str = "float32"
    architecture: str = field(default="mamba_lm", init=False)

    def __post_init__(self):
        if self.layers is not None:
            if self.mixer is not None:
                raise MQUserError("give either mixer (every layer) or layers (one per layer), not both")
            if not isinstance(self.layers, list) or not self.layers:
                raise MQUserError(f"layers must be a non-empty list of block configs, got {self.layers!r}")
            self.layers = _layer_list(self.layers, self.d_model)
            for i, m in enumerate(self.layers):
                if m.d_model != self.d_model:
                    raise MQUserError(f"layers[{i}].d_model {m.d_model} != d_model {self.d_model}")
            if isinstance(self.n_layer, int) and self.n_layer != len(self.layers):
                raise MQUserError(f"n_layer {self.n_layer} != {len(self.layers)} entries in layers")
        else:
            self.mixer = _mixer(self.mixer, self.d_model)
        check_int(self, "d_model")
        check_int(self, "n_layer", 1, MAX_LAYERS)
        check_int(self, "vocab_size", 1, MAX_VOCAB)
        check_bool(self, "residual_in_fp32", "tie_embeddings")
        check_positive_float(self, "norm_eps", "embedding_multiplier", "residual_multiplier", "logits_scaling")
        eos = self.eos_token_id
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size):
            raise MQUserError(f"eos_token_id must be a token id in [0, {self.vocab_size}), got {self.eos_token_id!r}")
        if self.mixer is not None and self.mixer.d_model != self.d_model:
            raise MQUserError(f"mixer.d_model {self.mixer.d_model} != d_model {self.d_model}")
        if any(getattr(m, "bimamba", False) for m in self.layer_configs()):
            raise MQUserError("a causal LM cannot use the bidirectional (bimamba) mixer")
        if self.state_dtype not in STATE_DTYPES:
            raise MQUserError(f"state_dtype must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype!r}")

    def layer_configs(self) -> list:
        """The block config of every layer."""
        return list(self.layers) if self.layers is not None else [self.mixer] * self.n_layer

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass
class VimConfig:
    """Vision Mamba (hustvl/Vim, bimamba v2, middle class token, absolute position embedding)."""

    d_model: int
    n_layer: int
    num_classes: int
    img_size: int = 224
    patch_size: int = 16
    stride: int | None = None           # default patch_size
    in_chans: int = 3
    mixer: object = None                # a registered family's mixer config (or its dict)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    # preprocessing applied by the data pipeline: (pixel / 255 - mean) / std, per channel
    # default: ImageNet's for 3 channels (as Vim trains), 0.5 / 0.5 otherwise
    image_mean: tuple | None = None
    image_std: tuple | None = None
    architecture: str = field(default="vim", init=False)

    def __post_init__(self):
        if self.stride is None:
            self.stride = self.patch_size
        self.mixer = _mixer(self.mixer, self.d_model, bimamba=True)
        check_int(self, "d_model")
        check_int(self, "n_layer", 1, MAX_LAYERS)
        check_int(self, "num_classes", 1, MAX_CLASSES)
        for name in ("img_size", "patch_size", "stride"):
            check_int(self, name, 1, MAX_IMAGE)
        check_int(self, "in_chans", 1, MAX_CHANNELS)
        check_bool(self, "residual_in_fp32")
        check_positive_float(self, "norm_eps")
        if self.mixer.d_model != self.d_model:
            raise MQUserError(f"mixer.d_model {self.mixer.d_model} != d_model {self.d_model}")
        if not getattr(self.mixer, "bimamba", False):
            raise MQUserError("Vim needs the bidirectional mixer (mixer.bimamba = true)")
        imagenet = self.in_chans == 3
        if self.image_mean is None:
            self.image_mean = (0.485, 0.456, 0.406) if imagenet else (0.5,) * self.in_chans
        if self.image_std is None:
            self.image_std = (0.229, 0.224, 0.225) if imagenet else (0.5,) * self.in_chans
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != self.in_chans:
                raise MQUserError(f"{name} needs {self.in_chans} entries (one per input channel), got {v!r}")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
                raise MQUserError(f"{name} must hold finite numbers, got {v!r}")
        if any(x <= 0 for x in self.image_std):   # pixels are divided by std
            raise MQUserError(f"image_std entries must be > 0, got {list(self.image_std)}")
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if self.patch_size > self.img_size:
            raise MQUserError(f"patch_size {self.patch_size} > img_size {self.img_size}")

    def layer_configs(self) -> list:
        return [self.mixer] * self.n_layer

    @property
    def grid(self) -> int:
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return _to_dict(self)


def _mixer(m, d_model: int, **default):
    """A model config's `mixer`: a registered family's config object, from its dict, or Mamba1's default."""
    from mq_deploy.families import family_of, mixer_config_from_dict

    if m is None:
        from mq_deploy.families.mamba1.config import MixerConfig

        return MixerConfig(d_model=d_model, **default)
    if isinstance(m, dict):
        return mixer_config_from_dict(m)
    family_of(m)          # refuses an object of no registered family
    return m


def _layer_list(layers, d_model) -> list:
    """Block configs from their dicts; identical dicts share one config object."""
    from mq_deploy.families import mixer_config_from_dict

    seen, out = {}, []
    for i, m in enumerate(layers):
        if isinstance(m, dict):
            key = repr(sorted(m.items()))
            if key not in seen:
                try:
                    seen[key] = mixer_config_from_dict(m)
                except MQUserError as e:
                    raise MQUserError(f"layers[{i}]: {e}") from None
            out.append(seen[key])
        else:
            out.append(_mixer(m, d_model))
    return out


def _to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    if getattr(cfg, "layers", None) is not None:
        d["mixer"] = None
        d["layers"] = [m.to_dict() for m in cfg.layers]
    else:
        d["mixer"] = cfg.mixer.to_dict()
        d.pop("layers", None)      # homogeneous models keep the files they always had
    for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if d.get(k) == 1.0:
            d.pop(k)
    if d.get("state_dtype") == "float32":       # every file written before the option stays as it was
        d.pop("state_dtype")
    return d


def config_from_dict(d: dict):
    """The one validator of a model config read back from a file (a checkpoint's config.json, an ONNX
    file's mq.config metadata): every field type- and range-checked; unknown fields refused."""
    if not isinstance(d, dict):
        raise MQUserError(f"a model config must be a JSON object, got {type(d).__name__}")
    d = dict(d)
    arch = d.pop("architecture", None)
    try:
        if arch == "mamba_lm":
            return MambaLMConfig(**d)
        if arch == "vim":
            return VimConfig(**d)
    except TypeError as e:  # unknown or missing field
        raise MQUserError(f"invalid {arch} config: {e}") from None
    raise MQUserError(f"unknown architecture {arch!r} (expected 'mamba_lm' or 'vim')")


# What the deployable artifact runs (the int8 scan and `mq-deploy export`): quantize and export take
# these; lower activation bits exist only as fake quantization (`mq-deploy compare --bits`).
EXPORT_WBITS = (4, 8)
EXPORT_ABITS = (8,)
