"""MLP blocks of hybrid models (Nemotron-H's squared-ReLU MLP, SwiGLU)."""

from mq_deploy.families import Family, register_family
from mq_deploy.families.mlp.config import MLPConfig

FAMILY = register_family(Family(
    name="mlp",
    config=MLPConfig,
    impl="mq_deploy.families.mlp.impl",
    points=("in", "down_proj"),           # the input of up/gate_proj; down_proj's input (after the rotation)
    heavy_tailed=("down_proj",),
    weight_sites=("up_proj", "gate_proj", "down_proj"),
    gptq_inputs={"up_proj": "in", "gate_proj": "in", "down_proj": "down_proj"},
    consumers={"in": "up_proj", "down_proj": "down_proj"},
    inspect=(("in", "up_proj"), ("down_proj", "down_proj")),
    input_point="in",
    states=lambda c: [],
    tolerances={"min_cosine": 0.999, "min_top1_agreement": 0.99, "max_metric_delta": 0.002},
    describe=lambda c: f"MLP: d_ff {c.d_ff}, {c.act}{' gated' if c.gated else ''}",
))

__all__ = ["FAMILY", "MLPConfig"]
