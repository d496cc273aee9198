"""The Zamba2 layer config: a Mamba2 block whose input may first receive one application of a shared
transformer block (attention over the concatenation [h, embeddings], then a gated MLP, then a per-depth
linear), as transformers' Zamba2HybridLayer computes it."""

from __future__ import annotations

from dataclasses import dataclass

from mq_deploy.config import check_positive_float
from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.families.mamba2.config import Mamba2Config
from mq_deploy.families.mlp.config import MLPConfig


def _child(v, cls, name: str, kind: str, optional: bool = False):
    """A sub-config object, or one from its dict (a config file's; its `kind`, when present, must be `kind`)."""
    if v is None and optional:
        return None
    if isinstance(v, cls):
        return v
    if not isinstance(v, dict):
        raise MQUserError(f"Zamba2LayerConfig.{name} must be the {kind} block's config (an object), got {v!r}")
    d = dict(v)
    if d.pop("kind", kind) != kind:
        raise MQUserError(f"Zamba2LayerConfig.{name}.kind must be {kind!r}, got {v.get('kind')!r}")
    try:
        return cls(**d)
    except TypeError as e:        # an unknown or missing field
        raise MQUserError(f"invalid Zamba2LayerConfig.{name} ({e})") from None


@dataclass
class Zamba2LayerConfig:
    """out = h + mamba(norm(h + T)), T = linear(mlp(norm(attention(norm([h, e]))))) when the layer applies the
    shared block (attention and mlp given), else T = 0 (a plain Mamba2 layer). e: the token embeddings.

    The shared block's two RMSNorms are weightless here: the loader folds their weights (and every per-depth
    LoRA adapter) into q/k/v and gate/up, so each application holds its own merged copy of the shared weights.
    attention.d_model is 2 d_model (its input is [h, e]); its o_proj maps back to d_model."""

    d_model: int
    mamba: object = None                # Mamba2Config (or its dict)
    attention: object = None            # AttentionConfig (or its dict), None: no shared block at this depth
    mlp: object = None                  # MLPConfig (or its dict), with attention
    shared_norm_eps: float = 1e-5       # eps of the shared block's two norms

    def __post_init__(self):
        from mq_deploy.config import check_int

        check_int(self, "d_model")
        check_positive_float(self, "shared_norm_eps")
        self.mamba = _child(self.mamba, Mamba2Config, "mamba", "mamba2")
        self.attention = _child(self.attention, AttentionConfig, "attention", "attention", optional=True)
        self.mlp = _child(self.mlp, MLPConfig, "mlp", "mlp", optional=True)
        if (self.attention is None) != (self.mlp is None):
            raise MQUserError("Zamba2LayerConfig: the shared block needs both attention and mlp (or neither)")
        if self.mamba.d_model != self.d_model:
            raise MQUserError(f"Zamba2LayerConfig.mamba.d_model {self.mamba.d_model} != d_model {self.d_model}")
        if self.attention is not None:
            if self.attention.d_model != 2 * self.d_model:
                raise MQUserError(f"Zamba2LayerConfig.attention.d_model {self.attention.d_model} != 2 x d_model "
                                  f"{2 * self.d_model} (it reads [hidden, embeddings])")
            if self.mlp.d_model != self.d_model:
                raise MQUserError(f"Zamba2LayerConfig.mlp.d_model {self.mlp.d_model} != d_model {self.d_model}")
            if not self.mlp.gated:
                raise MQUserError("Zamba2LayerConfig.mlp must be gated (Zamba2's gate_up_proj)")

    @property
    def shared(self) -> bool:
        return self.attention is not None

    @property
    def out_features(self) -> int:
        """The widest activation the layer holds at once."""
        widths = [self.mamba.out_features]
        if self.shared:
            widths += [self.attention.out_features, self.mlp.out_features]
        return max(widths)

    def to_dict(self) -> dict:
        d = {"kind": "zamba2", "d_model": self.d_model, "mamba": self.mamba.to_dict(),
             "shared_norm_eps": self.shared_norm_eps}
        if self.shared:
            d.update(attention=self.attention.to_dict(), mlp=self.mlp.to_dict())
        return d
