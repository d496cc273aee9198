"""Mamba2 (the SSD layer): mamba-ssm's `Mamba2` and transformers' `Mamba2ForCausalLM`."""

from mq_deploy.families import CheckpointFormat, Family, StateSpec, register_family
from mq_deploy.families.mamba2.config import Mamba2Config

_CK = "mq_deploy.families.mamba2.checkpoints"

FAMILY = register_family(Family(
    name="mamba2",
    config=Mamba2Config,
    impl="mq_deploy.families.mamba2.impl",
    # in_proj (its input), z (the gate), dt (in_proj's dt, before its bias: a scan input), conv1d (the conv's
    # input x|B|C), x, B, C (conv output after silu: the scan's inputs), out_proj (its input, after the norm)
    points=("in_proj", "z", "dt", "conv1d", "x", "B", "C", "out_proj"),
    heavy_tailed=("x", "dt", "B", "C", "out_proj"),
    weight_sites=("in_proj", "conv1d", "out_proj"),
    gptq_inputs={"in_proj": "in_proj", "out_proj": "out_proj"},
    consumers={"in_proj": "in_proj", "conv1d": "conv1d", "out_proj": "out_proj"},
    inspect=(("in_proj", "in_proj"), ("out_proj", "out_proj")),
    states=lambda cfg: [StateSpec("conv_state", (cfg.conv_dim, cfg.d_conv - 1), int8_scale="point:conv1d"),
                        StateSpec("ssm_state", (cfg.n_heads, cfg.head_dim, cfg.d_state), int8_scale="rows")],
    tolerances={"min_cosine": 0.999, "min_top1_agreement": 0.99, "max_metric_delta": 0.002},
    # Quamba2's granularity: x and dt one scale per head, B and C one per SSD group
    scale_groups=lambda c, point: {"x": c.n_heads, "dt": c.n_heads, "B": c.n_groups, "C": c.n_groups}.get(point, 1),
    describe=lambda c: (f"Mamba2: d_inner {c.d_inner}  heads {c.n_heads} x head_dim {c.head_dim}  groups "
                        f"{c.n_groups}  d_state {c.d_state}  d_conv {c.d_conv}"),
    formats=(
        CheckpointFormat("hf-mamba2", "mamba2", f"{_CK}:load_hf", hf_model_types=("mamba2",),
                         hf_architectures=("Mamba2ForCausalLM",)),
        CheckpointFormat("mamba-ssm-mamba2", "mamba2", f"{_CK}:load_mamba_ssm", ssm_layers=("Mamba2",)),
    ),
))

__all__ = ["FAMILY", "Mamba2Config"]
