"""The parallel block config: an attention block and a Mamba2 mixer reading the same normalised input, their
outputs summed (Falcon-H1's decoder layer before its MLP)."""

from __future__ import annotations

from dataclasses import dataclass

from mq_deploy.config import check_int
from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.families.mamba2.config import Mamba2Config


def _child(v, cls, name: str, kind: str):
    """A sub-config object, or one from its dict (a config file's; its `kind`, when present, must be `kind`)."""
    if isinstance(v, cls):
        return v
    if not isinstance(v, dict):
        raise MQUserError(f"ParallelConfig.{name} must be the {kind} block's config (an object), got {v!r}")
    d = dict(v)
    if d.pop("kind", kind) != kind:
        raise MQUserError(f"ParallelConfig.{name}.kind must be {kind!r}, got {v.get('kind')!r}")
    try:
        return cls(**d)
    except TypeError as e:        # an unknown or missing field
        raise MQUserError(f"invalid ParallelConfig.{name} ({e})") from None


@dataclass
class ParallelConfig:
    """out = attention(x) + mamba(x) for one normalised input x (any scalar multipliers of a checkpoint are
    folded into the children's linears by its loader)."""

    d_model: int
    attention: object = None            # AttentionConfig (or its dict)
    mamba: object = None                # Mamba2Config (or its dict)

    def __post_init__(self):
        check_int(self, "d_model")
        self.attention = _child(self.attention, AttentionConfig, "attention", "attention")
        self.mamba = _child(self.mamba, Mamba2Config, "mamba", "mamba2")
        for name in ("attention", "mamba"):
            if getattr(self, name).d_model != self.d_model:
                raise MQUserError(f"ParallelConfig.{name}.d_model {getattr(self, name).d_model} != d_model "
                                  f"{self.d_model}")

    @property
    def out_features(self) -> int:
        """The width of the block's activations at once (both children's, which coexist)."""
        return self.attention.out_features + self.mamba.out_features

    def to_dict(self) -> dict:
        return {"kind": "parallel", "d_model": self.d_model, "attention": self.attention.to_dict(),
                "mamba": self.mamba.to_dict()}
