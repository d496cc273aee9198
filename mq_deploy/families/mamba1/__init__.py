"""Mamba1 (mamba-ssm's `Mamba`): the causal LM, FalconMamba (weightless RMSNorm on dt, B, C) and Vision
Mamba (bimamba v2: a second, backward scan with its own conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b)."""

from mq_deploy.families import CheckpointFormat, Family, StateSpec, register_family
from mq_deploy.families.mamba1.config import MixerConfig

_CK = "mq_deploy.families.mamba1.checkpoints"

FAMILY = register_family(Family(
    name="mamba1",
    config=MixerConfig,
    impl="mq_deploy.families.mamba1.impl",
    # in_proj (its input), conv1d (its input), x (conv output after silu: input of x_proj and of the scan),
    # dt_low (input of dt_proj), dt, B, C (scan inputs), z (the gate), out_proj (its input)
    points=("in_proj", "conv1d", "x", "dt_low", "dt", "B", "C", "z", "out_proj"),
    heavy_tailed=("x", "dt", "B", "C", "out_proj"),
    weight_sites=("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"),
    gptq_inputs={"in_proj": "in_proj", "x_proj": "x", "dt_proj": "dt_low", "out_proj": "out_proj",
                 "x_proj_b": "x_b", "dt_proj_b": "dt_low_b"},
    consumers={"in_proj": "in_proj", "out_proj": "out_proj", "conv1d": "conv1d", "x": "x_proj", "dt_low": "dt_proj",
               "conv1d_b": "conv1d_b", "x_b": "x_proj_b", "dt_low_b": "dt_proj_b"},
    inspect=(("in_proj", "in_proj"), ("x", "x_proj"), ("out_proj", "out_proj")),
    states=lambda cfg: [] if cfg.bimamba else [
        StateSpec("conv_state", (cfg.d_inner, cfg.d_conv - 1), int8_scale="point:conv1d"),
        StateSpec("ssm_state", (cfg.d_inner, cfg.d_state), int8_scale="rows")],
    tolerances={"min_cosine": 0.999, "min_top1_agreement": 0.99, "max_metric_delta": 0.002},
    branch_points=("conv1d", "x", "dt_low", "dt", "B", "C"),
    branch_sites=("conv1d", "x_proj", "dt_proj"),
    has_branch=lambda cfg: cfg.bimamba,
    describe=lambda c: (f"Mamba1{' (FalconMamba: normed dt/B/C)' if c.mixer_rms_eps is not None else ''}: d_inner "
                        f"{c.d_inner}  d_state {c.d_state}  d_conv {c.d_conv}  dt_rank {c.dt_rank}"),
    formats=(
        CheckpointFormat("hf-mamba", "mamba1", f"{_CK}:load_hf", hf_model_types=("mamba",),
                         hf_architectures=("MambaForCausalLM",)),
        CheckpointFormat("hf-falcon-mamba", "mamba1", f"{_CK}:load_hf_falcon", hf_model_types=("falcon_mamba",),
                         hf_architectures=("FalconMambaForCausalLM",)),
        CheckpointFormat("mamba-ssm", "mamba1", f"{_CK}:load_mamba_ssm", ssm_layers=("Mamba1",)),
        CheckpointFormat("vim", "mamba1", f"{_CK}:load_vim"),
    ),
))

__all__ = ["FAMILY", "MixerConfig"]
