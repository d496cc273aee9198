"""The attention block config (GQA, RoPE full, partial or none, scaling), as hybrids use it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mq_deploy.config import MAX_WIDTH, check_bool, check_int
from mq_deploy.errors import MQUserError

KV_CACHE = ("fp32", "int8")        # how an attention layer's KV cache is stored (AttentionConfig.kv_cache)


@dataclass
class AttentionConfig:
    """q/k/v/o projections over n_heads query heads sharing n_kv_heads key/value heads (GQA), causal.

    rope_dim: how many of each head's first dimensions are rotated (0: no positions, Nemotron-H's and Jamba's
    "nope"; head_dim: full RoPE; between: partial), with transformers' rotate-half pairing and rope_theta.
    scaling: the score scale (None: head_dim ** -0.5; Granite's attention_multiplier replaces it).
    max_positions: the longest sequence the model knows (a longer prompt is refused), None: no limit.
    kv_cache: how the cache is stored: "fp32", or "int8" with one static scale per key/value head (the
    mixer's kv_scale buffer, calibrated by `mq-deploy quantize --kv-cache int8`)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    rope_dim: int = 0
    rope_theta: float = 10000.0
    scaling: float | None = None
    max_positions: int | None = None
    kv_cache: str = "fp32"

    def __post_init__(self):
        for name in ("d_model", "n_heads", "n_kv_heads", "head_dim"):
            check_int(self, name, 1, MAX_WIDTH)
        check_bool(self, "qkv_bias", "out_bias")
        check_int(self, "rope_dim", 0, self.head_dim)
        if self.rope_dim % 2:
            raise MQUserError(f"AttentionConfig.rope_dim {self.rope_dim} must be even (pairs of dimensions rotate)")
        if self.n_heads % self.n_kv_heads:
            raise MQUserError(f"AttentionConfig: {self.n_heads} heads are not a multiple of {self.n_kv_heads} "
                              "key/value heads")
        for name in ("rope_theta", "scaling"):
            v = getattr(self, name)
            if v is None and name == "scaling":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise MQUserError(f"AttentionConfig.{name} must be a finite number > 0, got {v!r}")
        if self.max_positions is not None:
            check_int(self, "max_positions", 1, 1 << 24)
        if self.kv_cache not in KV_CACHE:
            raise MQUserError(f"AttentionConfig.kv_cache must be one of {', '.join(KV_CACHE)}, got {self.kv_cache!r}")

    @property
    def score_scale(self) -> float:
        return self.head_dim ** -0.5 if self.scaling is None else float(self.scaling)

    @property
    def out_features(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict:
        return {"kind": "attention", **dataclasses.asdict(self)}


def attention_configs(model_cfg) -> list:
    """Every AttentionConfig of a model config's blocks, nested ones included (a parallel block's, Zamba2's
    shared blocks), each once."""
    out, seen = [], set()

    def walk(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, AttentionConfig):
            out.append(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x)

    for layer in model_cfg.layer_configs():
        walk(layer)
    return out
