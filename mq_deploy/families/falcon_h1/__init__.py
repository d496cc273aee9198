"""TII Falcon-H1 (transformers' FalconH1ForCausalLM, model_type falcon_h1): in every layer attention and a
Mamba2 mixer run in parallel on the same normed input and their sum joins the residual stream, then a SwiGLU
MLP; muP multipliers throughout. A checkpoint format over the parallel and mlp families (each HF layer is two
of our blocks: a parallel block under input_layernorm, the MLP under pre_ff_layernorm)."""

from mq_deploy.families import CheckpointFormat, register_format

FORMAT = register_format(CheckpointFormat(
    "hf-falcon-h1", "hybrid", "mq_deploy.families.falcon_h1.checkpoints:load_hf", hf_model_types=("falcon_h1",),
    hf_architectures=("FalconH1ForCausalLM",),
    not_streamable="its multipliers are folded into the weights after they are read"))
