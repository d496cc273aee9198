"""The mixture-of-experts block config of hybrids: a floating-point top-k router, routed experts (each an
MLP), an optional shared expert that sees every token."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mq_deploy.config import MAX_WIDTH, check_bool, check_int
from mq_deploy.errors import MQUserError

# How the router turns its logits [tokens, experts] into k (weight, expert) pairs:
#   softmax       softmax over every expert, the top k of it (Jamba, Mixtral)
#   topk_softmax  the top k logits, softmax over those k (Granite-4.0-H's block_sparse_moe)
#   sigmoid       sigmoid scores; the choice on scores + a correction bias within the best topk_group of
#                 n_group groups (a group's score: its two best), the weights the chosen plain scores
#                 (Nemotron-H, DeepSeek-V3)
# then, in every form, weights / their sum when norm_topk_prob, and * routed_scaling_factor.
ROUTERS = ("softmax", "topk_softmax", "sigmoid")
EXPERT_ACTS = ("relu2", "silu", "gelu", "relu")
MAX_EXPERTS = 4096


@dataclass
class MoEConfig:
    """out = sum_k w_k expert_{i_k}(x) + shared(x); an expert is down(act(up(x))) or, `gated`,
    down(act(gate(x)) * up(x)). The shared expert (shared_d_ff > 0) has its own width, activation and
    bias; the routed experts have no biases (none of the supported checkpoints has them)."""

    d_model: int
    n_experts: int
    top_k: int
    d_ff: int
    act: str = "silu"
    gated: bool = True
    router: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    score_correction_bias: bool = False      # e_score_correction_bias (router "sigmoid" only)
    shared_d_ff: int = 0                     # 0: no shared expert
    shared_act: str = "silu"
    shared_gated: bool = True
    shared_bias: bool = False

    def __post_init__(self):
        check_int(self, "d_model", 1, MAX_WIDTH)
        check_int(self, "n_experts", 1, MAX_EXPERTS)
        check_int(self, "top_k", 1, MAX_EXPERTS)
        check_int(self, "d_ff", 1, 1 << 20)
        check_int(self, "shared_d_ff", 0, 1 << 20)
        check_int(self, "n_group", 1, MAX_EXPERTS)
        check_int(self, "topk_group", 1, MAX_EXPERTS)
        check_bool(self, "gated", "norm_topk_prob", "score_correction_bias", "shared_gated", "shared_bias")
        name = type(self).__name__
        if self.router not in ROUTERS:
            raise MQUserError(f"{name}.router {self.router!r} is not a supported scoring function "
                              f"(choose from {', '.join(ROUTERS)})")
        for field in ("act", "shared_act"):
            if getattr(self, field) not in EXPERT_ACTS:
                raise MQUserError(f"{name}.{field} {getattr(self, field)!r} is not supported "
                                  f"(choose from {', '.join(EXPERT_ACTS)})")
        f = self.routed_scaling_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise MQUserError(f"{name}.routed_scaling_factor must be a finite number > 0, got {f!r}")
        if self.top_k > self.n_experts:
            raise MQUserError(f"{name}.top_k {self.top_k} is more than the {self.n_experts} experts (n_experts)")
        if self.n_experts % self.n_group:
            raise MQUserError(f"{name}.n_group {self.n_group} does not divide the {self.n_experts} experts")
        if self.topk_group > self.n_group:
            raise MQUserError(f"{name}.topk_group {self.topk_group} is more than n_group {self.n_group}")
        if self.router != "sigmoid" and (self.n_group != 1 or self.score_correction_bias):
            raise MQUserError(f"{name}.n_group / score_correction_bias: group-limited routing and the correction "
                              f"bias belong to router 'sigmoid', not {self.router!r}")
        if self.n_group > 1:
            per = self.n_experts // self.n_group
            if per < 2:     # a group's score is the sum of its two best experts
                raise MQUserError(f"{name}.n_group {self.n_group}: {per} expert per group; group-limited routing "
                                  "scores each group by its two best experts")
            if self.top_k > self.topk_group * per:
                raise MQUserError(f"{name}.top_k {self.top_k} is more than the {self.topk_group * per} experts of "
                                  f"the topk_group {self.topk_group} groups it may choose from")

    @property
    def out_features(self) -> int:
        """Width of down_proj's input (where the online rotation acts)."""
        return self.d_ff

    def to_dict(self) -> dict:
        return {"kind": "moe", **dataclasses.asdict(self)}
