"""Validated model configs. Library functions take these, never argparse namespaces."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mq_deploy.errors import MQUserError


def _positive_int(obj, *names):
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise MQUserError(f"{type(obj).__name__}.{name} must be a positive integer, got {v!r}")


def _positive_float(obj, *names):
    """eps-like fields: a finite number > 0 (a negative eps makes rsqrt of a negative mean square: NaN)."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise MQUserError(f"{type(obj).__name__}.{name} must be a finite number > 0, got {v!r}")


@dataclass
class MixerConfig:
    """The Mamba1 mixer, as in mamba-ssm's `Mamba` module."""

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    d_inner: int | None = None          # default expand * d_model (HF calls it intermediate_size)
    dt_rank: int | str = "auto"         # "auto" -> ceil(d_model / 16)
    conv_bias: bool = True
    bias: bool = False                  # bias of in_proj and out_proj
    bimamba: bool = False               # Vim "v2": a second, backward scan with its own conv/x/dt/A/D
    # FalconMamba: weightless RMSNorm on the low-rank dt, B and C right after x_proj (None: plain Mamba1)
    mixer_rms_eps: float | None = None

    def __post_init__(self):
        if self.d_inner is None:
            self.d_inner = self.expand * self.d_model
        if self.dt_rank == "auto" and isinstance(self.d_model, int) and not isinstance(self.d_model, bool):
            self.dt_rank = math.ceil(self.d_model / 16)
        _positive_int(self, "d_model", "d_state", "d_conv", "expand", "d_inner", "dt_rank")
        if self.mixer_rms_eps is not None:
            _positive_float(self, "mixer_rms_eps")


@dataclass
class MambaLMConfig:
    d_model: int
    n_layer: int
    vocab_size: int
    mixer: MixerConfig = None  # type: ignore[assignment]
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    eos_token_id: int | None = None     # generation stops here (from the HF config or the tokenizer)
    architecture: str = field(default="mamba_lm", init=False)

    def __post_init__(self):
        if self.mixer is None:
            self.mixer = MixerConfig(d_model=self.d_model)
        elif isinstance(self.mixer, dict):
            self.mixer = MixerConfig(**self.mixer)
        _positive_int(self, "d_model", "n_layer", "vocab_size")
        _positive_float(self, "norm_eps")
        eos = self.eos_token_id
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size):
            raise MQUserError(f"eos_token_id must be a token id in [0, {self.vocab_size}), got {self.eos_token_id!r}")
        if self.mixer.d_model != self.d_model:
            raise MQUserError(f"mixer.d_model {self.mixer.d_model} != d_model {self.d_model}")
        if self.mixer.bimamba:
            raise MQUserError("a causal LM cannot use the bidirectional (bimamba) mixer")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    mixer: MixerConfig = None  # type: ignore[assignment]
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
        if self.mixer is None:
            self.mixer = MixerConfig(d_model=self.d_model, bimamba=True)
        elif isinstance(self.mixer, dict):
            self.mixer = MixerConfig(**self.mixer)
        _positive_int(self, "d_model", "n_layer", "num_classes", "img_size", "patch_size", "stride",
                      "in_chans")
        _positive_float(self, "norm_eps")
        if self.mixer.d_model != self.d_model:
            raise MQUserError(f"mixer.d_model {self.mixer.d_model} != d_model {self.d_model}")
        if not self.mixer.bimamba:
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

    @property
    def grid(self) -> int:
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_dict(d: dict):
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
