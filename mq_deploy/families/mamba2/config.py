"""The Mamba2 mixer config (mamba-ssm's `Mamba2`, transformers' `Mamba2Mixer`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mq_deploy.config import MAX_CONV, MAX_STATE, MAX_WIDTH, check_bool, check_int, check_positive_float
from mq_deploy.errors import MQUserError


@dataclass
class Mamba2Config:
    """in_proj -> [z (d_inner), xBC (d_inner + 2 G N), dt (H)]; causal depthwise conv + SiLU over xBC; SSD scan
    with one scalar A, dt bias and D per head; gated RMSNorm; out_proj.

    The gated norm, pinned per source (both read here as groups of d_inner / norm_groups channels):
    mamba-ssm's RMSNormGated(group_size = d_inner / n_groups, norm_before_gate) and transformers 5.x's
    Mamba2RMSNormGated (group_size = d_inner / n_groups, the gate before the norm). `norm_before_gate`:
    norm(y) * w * silu(z) instead of norm(y * silu(z)) * w. `rmsnorm` false: y * silu(z), no norm."""

    d_model: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    d_inner: int | None = None          # default expand * d_model
    conv_bias: bool = True
    bias: bool = False                  # in_proj and out_proj
    rmsnorm: bool = True
    norm_before_gate: bool = False
    norm_groups: int | None = None      # groups of the gated norm (default n_groups)
    norm_eps: float = 1e-5
    dt_min: float = 0.0                 # time_step_limit: dt is clamped to [dt_min, dt_max] after softplus
    dt_max: float | None = None         # None: no upper limit (JSON has no infinity)
    chunk_size: int = 256               # the SSD chunk the export writes (numerically exact for any)

    def __post_init__(self):
        if self.d_inner is None and isinstance(self.expand, int) and isinstance(self.d_model, int):
            self.d_inner = self.expand * self.d_model
        if self.norm_groups is None:
            self.norm_groups = self.n_groups
        for name, hi in (("d_model", MAX_WIDTH), ("d_state", MAX_STATE), ("d_conv", MAX_CONV), ("expand", 64),
                         ("d_inner", MAX_WIDTH), ("head_dim", MAX_WIDTH), ("n_groups", MAX_WIDTH),
                         ("norm_groups", MAX_WIDTH), ("chunk_size", 1 << 16)):
            check_int(self, name, 1, hi)
        check_bool(self, "conv_bias", "bias", "rmsnorm", "norm_before_gate")
        check_positive_float(self, "norm_eps")
        if self.d_inner % self.head_dim:
            raise MQUserError(f"Mamba2Config: d_inner {self.d_inner} is not a multiple of head_dim {self.head_dim}")
        if self.n_heads % self.n_groups:
            raise MQUserError(f"Mamba2Config: {self.n_heads} heads are not a multiple of n_groups {self.n_groups}")
        if self.d_inner % self.norm_groups:
            raise MQUserError(f"Mamba2Config: d_inner {self.d_inner} is not a multiple of norm_groups "
                              f"{self.norm_groups}")
        for name in ("dt_min", "dt_max"):
            v = getattr(self, name)
            if v is None and name == "dt_max":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise MQUserError(f"Mamba2Config.{name} must be a finite number >= 0, got {v!r}")
        if self.dt_max is not None and self.dt_max <= self.dt_min:
            raise MQUserError(f"Mamba2Config: dt_max {self.dt_max} must exceed dt_min {self.dt_min}")

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv (x, B and C together)."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def out_features(self) -> int:
        return self.d_inner

    @property
    def dt_limit(self) -> tuple:
        return (float(self.dt_min), None if self.dt_max is None else float(self.dt_max))

    def to_dict(self) -> dict:
        return {"kind": "mamba2", **dataclasses.asdict(self)}
