"""Nemotron-H HF folders: config parsing (the layer pattern) and key map. Readers and checks are
mq_deploy.models.loaders'."""

from __future__ import annotations

import os

from mq_deploy.config import MambaLMConfig
from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.families.mamba2.checkpoints import dt_limit
from mq_deploy.families.mamba2.config import Mamba2Config
from mq_deploy.families.mlp.config import MLPConfig
from mq_deploy.families.moe.checkpoints import ExpertsSource
from mq_deploy.families.moe.config import MoEConfig
from mq_deploy.models.loaders import (
    config_for,
    eos_token,
    hf_tensor_source,
    json_flag,
    load_into,
    read_json,
    shown,
    with_tokenizer,
)

# layers_block_type values (old and new spellings) and hybrid_override_pattern characters -> block kind
_KINDS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-", "moe": "E"}
_PATTERN = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe"}


def layer_kinds(c: dict, src: str) -> list:
    """The block kind of every layer: from layers_block_type, or the hybrid_override_pattern string."""
    types = c.get("layers_block_type") or c.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not types:
            raise MQUserError(f"{shown(src)}: layers_block_type must be a non-empty list, got {types!r}")
        bad = next((t for t in types if t not in _KINDS), None)
        if bad is not None:
            raise MQUserError(f"{shown(src)}: layers_block_type entry {bad!r} is not a known layer kind "
                              f"({', '.join(sorted(_KINDS))})")
        pattern = "".join(_KINDS[t] for t in types)
    else:
        pattern = c.get("hybrid_override_pattern")
        if not isinstance(pattern, str) or not pattern:
            raise MQUserError(f"{shown(src)}: neither layers_block_type nor hybrid_override_pattern says the layers")
        bad = next((ch for ch in pattern if ch not in _PATTERN), None)
        if bad is not None:
            raise MQUserError(f"{shown(src)}: hybrid_override_pattern character {bad!r} is not a known layer kind "
                              "(M Mamba2, * attention, - MLP, E MoE)")
    return [_PATTERN[ch] for ch in pattern]


def moe_of(c: dict, d, src: str) -> MoEConfig:
    """NemotronHMoE: sigmoid router with e_score_correction_bias and group-limited choice, squared-ReLU
    experts without biases, one shared expert (moe_shared_expert_intermediate_size, mlp_bias)."""
    if c.get("moe_latent_size") is not None:
        raise MQUserError(f"{shown(src)}: moe_latent_size {c['moe_latent_size']!r}: latent expert projections "
                          "are not supported")
    if c.get("scoring_func", "sigmoid") != "sigmoid":
        raise MQUserError(f"{shown(src)}: scoring_func {c['scoring_func']!r} is not Nemotron-H's router (sigmoid)")
    act = c.get("mlp_hidden_act", "relu2")
    return MoEConfig(
        d_model=d, n_experts=c.get("n_routed_experts", c.get("num_local_experts", 8)),
        top_k=c.get("num_experts_per_tok", 2), d_ff=c.get("moe_intermediate_size", 7688), act=act, gated=False,
        router="sigmoid", norm_topk_prob=json_flag(c, "norm_topk_prob", True, src),
        routed_scaling_factor=c.get("routed_scaling_factor", 1.0), n_group=c.get("n_group", 1),
        topk_group=c.get("topk_group", 1), score_correction_bias=True,
        shared_d_ff=c.get("moe_shared_expert_intermediate_size", 7688), shared_act=act, shared_gated=False,
        shared_bias=json_flag(c, "mlp_bias", False, src))


def _get(c, key, default=None):
    return c.get(key, default)


def load_hf(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    kinds = layer_kinds(c, cfg_path)
    d = c.get("hidden_size")
    eps = _get(c, "layer_norm_epsilon", 1e-5)
    for key in ("mamba_hidden_act",):
        if _get(c, key, "silu") not in ("silu", "swish"):
            raise MQUserError(f"{shown(cfg_path)}: {key} {c[key]!r} is not supported (silu)")
    if json_flag(c, "attention_bias", False, cfg_path):
        raise MQUserError(f"{shown(cfg_path)}: attention_bias true is not supported (transformers' Nemotron-H "
                          "attention has no biases)")
    heads, head_dim = _get(c, "mamba_num_heads", 128), _get(c, "mamba_head_dim", 64)
    groups = _get(c, "n_groups", _get(c, "mamba_n_groups", 8))
    limits = dt_limit(_get(c, "time_step_limit", _get(c, "mamba_dt_limit")), "time_step_limit", cfg_path)
    blocks = {}

    def block(kind):
        if kind not in blocks:
            if kind == "mamba2":
                d_inner = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
                blocks[kind] = config_for(cfg_path, lambda: Mamba2Config(
                    d_model=d, d_state=_get(c, "ssm_state_size", 128), d_conv=_get(c, "conv_kernel", 4),
                    expand=max(1, (d_inner or 1) // d) if isinstance(d, int) and d > 0 else 2,
                    head_dim=head_dim, n_groups=groups, d_inner=d_inner,
                    conv_bias=_get(c, "use_conv_bias", True), bias=_get(c, "use_bias", False),
                    # NemotronHRMSNormGated: group_size d_inner // n_groups, the gate before the norm, eps
                    # layer_norm_epsilon
                    rmsnorm=True, norm_before_gate=False, norm_groups=groups, norm_eps=eps,
                    chunk_size=_get(c, "chunk_size", 128), **limits))
            elif kind == "attention":
                blocks[kind] = config_for(cfg_path, lambda: AttentionConfig(
                    d_model=d, n_heads=_get(c, "num_attention_heads", 32), n_kv_heads=_get(c, "num_key_value_heads", 8),
                    head_dim=_get(c, "head_dim", 128), rope_dim=0))          # Nemotron-H: no positional encoding
            elif kind == "moe":
                blocks[kind] = config_for(cfg_path, lambda: moe_of(c, d, cfg_path))
            else:
                blocks[kind] = config_for(cfg_path, lambda: MLPConfig(
                    d_model=d, d_ff=_get(c, "intermediate_size", 21504), act=_get(c, "mlp_hidden_act", "relu2"),
                    gated=False, bias=_get(c, "mlp_bias", False)))
        return blocks[kind]

    layers = [block(k) for k in kinds]
    vocab = c.get("vocab_size", 0)
    json_flag(c, "tie_word_embeddings", False, cfg_path)
    src, tensors = hf_tensor_source(path, "HF Nemotron-H")
    tensors = tensors.rename([(r"^(model|backbone)\.embeddings\.", "embedding."), (r"^(model|backbone)\.", "")])
    if "moe" in kinds:
        tensors = ExpertsSource(
            tensors.rename([(r"\.mixer\.gate\.weight$", ".mixer.router.weight"),
                            (r"\.mixer\.gate\.e_score_correction_bias$", ".mixer.e_score_correction_bias"),
                            (r"\.mixer\.shared_experts\.up_proj\.", ".mixer.shared_up."),
                            (r"\.mixer\.shared_experts\.down_proj\.", ".mixer.shared_down.")]),
            stack=[(r"^(?P<pre>layers\.\d+\.mixer\.)experts\.(?P<e>\d+)\.(?P<p>up_proj|down_proj)\.weight$",
                    r"\g<pre>\g<p>.weight")],
            flatten=[(r"^(layers\.\d+\.mixer\.)experts\.(up_proj|down_proj)$", r"\1\2.weight")])
    # transformers' NemotronHForCausalLM ties nothing (tie_word_embeddings or not): a head in the file is
    # used as it is; only a file without one reads the embedding as its head
    tied = "lm_head.weight" not in tensors.shapes
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=d, n_layer=len(layers), vocab_size=vocab, layers=layers, norm_eps=eps,
        residual_in_fp32=c.get("residual_in_fp32", False), tie_embeddings=tied, eos_token_id=eos_token(c, vocab)))
    return load_into(cfg, tensors, src, cfg_path), cfg, with_tokenizer(path, {})
