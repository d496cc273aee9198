"""The Mamba1 mixer config (mamba-ssm's `Mamba` module; FalconMamba and Vim are its variants)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mq_deploy.config import MAX_CONV, MAX_STATE, MAX_WIDTH, check_bool, check_int, check_positive_float
from mq_deploy.errors import MQUserError


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
    # Jamba: those three norms carry weights (dt_layernorm, b_layernorm, c_layernorm; eps mixer_rms_eps).
    # Off by default and left out of to_dict when off, so every existing artifact stays byte-identical
    inner_norm_weights: bool = False

    def __post_init__(self):
        if self.d_inner is None and isinstance(self.expand, int) and isinstance(self.d_model, int):
            self.d_inner = self.expand * self.d_model
        if self.dt_rank == "auto" and isinstance(self.d_model, int) and not isinstance(self.d_model, bool):
            self.dt_rank = math.ceil(self.d_model / 16)
        for name, hi in (("d_model", MAX_WIDTH), ("d_state", MAX_STATE), ("d_conv", MAX_CONV), ("expand", 64),
                         ("d_inner", MAX_WIDTH), ("dt_rank", MAX_WIDTH)):
            check_int(self, name, 1, hi)
        check_bool(self, "conv_bias", "bias", "bimamba")
        if self.mixer_rms_eps is not None:
            check_positive_float(self, "mixer_rms_eps")
        check_bool(self, "inner_norm_weights")
        if self.inner_norm_weights and (self.mixer_rms_eps is None or self.bimamba):
            raise MQUserError("MixerConfig.inner_norm_weights: weighted dt/B/C norms need mixer_rms_eps (their eps) "
                              "and a causal mixer (not bimamba)")

    @property
    def out_features(self) -> int:
        """Width of out_proj's input (where the online rotation acts)."""
        return self.d_inner

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)         # no "kind": Mamba1 is what a mixer dict without one means
        if not d["inner_norm_weights"]:
            del d["inner_norm_weights"]
        return d
