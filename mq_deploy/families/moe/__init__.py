"""Mixture-of-experts blocks of hybrid models (Nemotron-H's E layers, Granite-4.0-H's block_sparse_moe with
its shared_mlp, Jamba's sparse MoE): a floating-point top-k router, routed experts that are MLPs
(squared ReLU, or SwiGLU), an optional shared expert."""

from mq_deploy.families import Family, register_family
from mq_deploy.families.moe.config import MoEConfig


def _describe(c) -> str:
    act = f"{c.act}{' gated' if c.gated else ''}"
    shared = f", shared expert d_ff {c.shared_d_ff}" if c.shared_d_ff else ""
    return f"MoE: {c.n_experts} experts, top {c.top_k} ({c.router}), d_ff {c.d_ff} {act}{shared}"


FAMILY = register_family(Family(
    name="moe",
    config=MoEConfig,
    impl="mq_deploy.families.moe.impl",
    # the experts' input (the block norm's output, quantized once for every expert and the shared one);
    # each routed expert's down_proj input (after the online Hadamard); the shared expert's down input.
    # The router reads the norm's output unquantized: it is no quant point.
    points=("in", "down_proj", "shared_down"),
    heavy_tailed=("down_proj", "shared_down"),
    weight_sites=("up_proj", "gate_proj", "down_proj", "shared_up", "shared_gate", "shared_down"),
    gptq_inputs={"up_proj": "in", "gate_proj": "in", "down_proj": "down_proj", "shared_up": "in",
                 "shared_gate": "in", "shared_down": "shared_down"},
    consumers={"in": "up_proj", "down_proj": "down_proj", "shared_down": "shared_down"},
    inspect=(("in", "up_proj"), ("down_proj", "down_proj")),
    input_point="in",
    states=lambda c: [],
    tolerances={"min_cosine": 0.999, "min_top1_agreement": 0.99, "max_metric_delta": 0.002},
    describe=_describe,
))

__all__ = ["FAMILY", "MoEConfig"]
