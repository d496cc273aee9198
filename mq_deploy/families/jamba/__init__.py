"""AI21 Jamba (transformers' JambaForCausalLM, model_type jamba): every layer a Mamba1 mixer whose dt, B and
C pass weighted RMSNorms, or (every attn_layer_period-th layer, at attn_layer_offset) attention without
positions; each followed by a SwiGLU MLP or (every expert_layer_period-th, at expert_layer_offset) a
top-k softmax MoE. A checkpoint format over the mamba1, attention, mlp and moe families (each HF layer is
two of our blocks)."""

from mq_deploy.families import CheckpointFormat, register_format

FORMAT = register_format(CheckpointFormat(
    "hf-jamba", "hybrid", "mq_deploy.families.jamba.checkpoints:load_hf", hf_model_types=("jamba",),
    hf_architectures=("JambaForCausalLM",)))
