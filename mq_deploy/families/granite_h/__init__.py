"""IBM Granite-4.0-H (transformers' GraniteMoeHybridForCausalLM, model_type granitemoehybrid): every layer a
Mamba2 mixer or an attention block (RoPE or none), each followed by a shared SwiGLU MLP, with muP scalars.
A checkpoint format over the mamba2, attention and mlp families (each HF layer is two of our blocks)."""

from mq_deploy.families import CheckpointFormat, register_format

FORMAT = register_format(CheckpointFormat(
    "hf-granite-h", "hybrid", "mq_deploy.families.granite_h.checkpoints:load_hf",
    hf_model_types=("granitemoehybrid",), hf_architectures=("GraniteMoeHybridForCausalLM",)))
