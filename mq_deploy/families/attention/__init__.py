"""Attention blocks of hybrid models: grouped-query attention, RoPE full/partial/none, a KV cache per layer."""

from mq_deploy.families import Family, StateSpec, register_family
from mq_deploy.families.attention.config import AttentionConfig

FAMILY = register_family(Family(
    name="attention",
    config=AttentionConfig,
    impl="mq_deploy.families.attention.impl",
    # qkv: the input of q_proj, k_proj and v_proj; o_proj: its input (the heads' outputs, after the rotation)
    points=("qkv", "o_proj"),
    heavy_tailed=("o_proj",),
    weight_sites=("q_proj", "k_proj", "v_proj", "o_proj"),
    gptq_inputs={"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o_proj"},
    consumers={"qkv": "q_proj", "o_proj": "o_proj"},
    inspect=(("qkv", "q_proj"), ("o_proj", "o_proj")),
    input_point="qkv",
    # the caches [kv_heads, length, head_dim], float32 or int8 (kv_cache; scales per head: the mixer's kv_scale)
    states=lambda c: [StateSpec("past_key", (c.n_kv_heads, None, c.head_dim), stacked=False, output="present_key",
                                dtype="int8" if c.kv_cache == "int8" else "float32"),
                      StateSpec("past_value", (c.n_kv_heads, None, c.head_dim), stacked=False,
                                output="present_value", dtype="int8" if c.kv_cache == "int8" else "float32")],
    tolerances={"min_cosine": 0.999, "min_top1_agreement": 0.99, "max_metric_delta": 0.002},
    describe=lambda c: (f"attention: {c.n_heads} heads ({c.n_kv_heads} key/value) x head_dim {c.head_dim}, "
                        f"RoPE {'none' if not c.rope_dim else f'{c.rope_dim} dims'}"
                       + (", int8 KV cache (a scale per head)" if c.kv_cache == "int8" else "")),
))

__all__ = ["AttentionConfig", "FAMILY"]
