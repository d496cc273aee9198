"""The MLP block config of hybrids: plain (Nemotron-H's squared ReLU) or gated (SwiGLU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mq_deploy.config import MAX_WIDTH, check_bool, check_int
from mq_deploy.errors import MQUserError

ACTIVATIONS = ("relu2", "silu", "gelu", "relu")


@dataclass
class MLPConfig:
    """down_proj(act(up_proj(x))), or with `gated` down_proj(act(gate_proj(x)) * up_proj(x)) (SwiGLU with silu)."""

    d_model: int
    d_ff: int
    act: str = "relu2"
    gated: bool = False
    bias: bool = False

    def __post_init__(self):
        check_int(self, "d_model", 1, MAX_WIDTH)
        check_int(self, "d_ff", 1, 1 << 20)
        check_bool(self, "gated", "bias")
        if self.act not in ACTIVATIONS:
            raise MQUserError(f"MLPConfig.act {self.act!r} is not supported (choose from {', '.join(ACTIVATIONS)})")

    @property
    def out_features(self) -> int:
        return self.d_ff

    def to_dict(self) -> dict:
        return {"kind": "mlp", **dataclasses.asdict(self)}
