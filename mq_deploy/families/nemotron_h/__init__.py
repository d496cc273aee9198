"""NVIDIA Nemotron-H (transformers' NemotronHForCausalLM, model_type nemotron_h): a hybrid LM whose layers
are Mamba2 mixers, attention (no positions), squared-ReLU MLPs and MoE blocks, in the order its pattern gives. A
checkpoint format over the mamba2, attention, mlp and moe families."""

from mq_deploy.families import CheckpointFormat, register_format

FORMAT = register_format(CheckpointFormat(
    "hf-nemotron-h", "hybrid", "mq_deploy.families.nemotron_h.checkpoints:load_hf", hf_model_types=("nemotron_h",),
    hf_architectures=("NemotronHForCausalLM",)))
