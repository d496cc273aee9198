"""IBM Bamba (transformers' BambaForCausalLM, model_type bamba): every layer a Mamba2 mixer or, at
attn_layer_indices, attention with partial RoPE; each followed by a SwiGLU feed-forward. A checkpoint format
over the mamba2, attention and mlp families (each HF layer is two of our blocks, as Granite-4.0-H's)."""

from mq_deploy.families import CheckpointFormat, register_format

FORMAT = register_format(CheckpointFormat(
    "hf-bamba", "hybrid", "mq_deploy.families.bamba.checkpoints:load_hf", hf_model_types=("bamba",),
    hf_architectures=("BambaForCausalLM",)))
