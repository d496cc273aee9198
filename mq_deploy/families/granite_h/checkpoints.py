"""Granite-4.0-H HF folders: config parsing and key map. HF layer i is our blocks 2i (its Mamba2 mixer or
attention, input_layernorm) and 2i + 1 (its shared_mlp, post_attention_layernorm; with num_local_experts > 0
an MoE block: block_sparse_moe and the shared_mlp as its shared expert); input_linear's rows are [gate | up]
(per expert in block_sparse_moe's [experts, 2 * d_ff, d]). Readers and checks are mq_deploy.models.loaders'."""

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

_KINDS = {"mamba": "mamba2", "linear_attention": "mamba2", "attention": "attention", "full_attention": "attention"}


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        if params.get("rope_type", "default") != "default":
            raise MQUserError(f"rope_type {params['rope_type']!r} is not supported (default RoPE only)")
        return params["rope_theta"]
    return c.get("rope_theta", 10000.0)


def paired_layers(kinds, mamba, attention, mlp) -> list:
    """Our blocks of HF hybrids whose layer i is a mixer (Mamba2 or attention) then an MLP: 2i and 2i + 1."""
    return [b for k in kinds for b in ((mamba if k == "mamba2" else attention), mlp)]


def paired_rules(n_layers: int, prefix: str, mixer: str, mixer_norm: str, mlp: str, mlp_norm: str) -> list:
    """Key renames for paired_layers: HF layer i's mixer / its norm -> our block 2i, its MLP / norm -> 2i + 1."""
    rules = []
    for i in range(n_layers):
        rules += [(rf"^{prefix}\.layers\.{i}\.{mixer_norm}\.", f"layers.{2 * i}.norm."),
                  (rf"^{prefix}\.layers\.{i}\.{mixer}\.", f"layers.{2 * i}.mixer."),
                  (rf"^{prefix}\.layers\.{i}\.{mlp_norm}\.", f"layers.{2 * i + 1}.norm."),
                  (rf"^{prefix}\.layers\.{i}\.{mlp}\.", f"layers.{2 * i + 1}.mixer.")]
    return rules


def mamba2_of(c: dict, d, eps, limits) -> Mamba2Config:
    """The Mamba2 mixer of Granite-4.0-H and Bamba configs (mamba_* keys; gated norm per group, gate first)."""
    mh, md = c.get("mamba_n_heads", 128), c.get("mamba_d_head", 64)
    groups = c.get("mamba_n_groups", 1)
    return Mamba2Config(
        d_model=d, d_state=c.get("mamba_d_state", 128), d_conv=c.get("mamba_d_conv", 4),
        expand=c.get("mamba_expand", 2), head_dim=md, n_groups=groups,
        d_inner=mh * md if isinstance(mh, int) and isinstance(md, int) else None,
        conv_bias=c.get("mamba_conv_bias", True), bias=c.get("mamba_proj_bias", False),
        rmsnorm=True, norm_before_gate=False, norm_groups=groups, norm_eps=eps,
        chunk_size=c.get("mamba_chunk_size", 256), **limits)


def load_hf(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    types = c.get("layer_types") or c.get("layers_block_type")
    if not isinstance(types, list) or not types or any(t not in _KINDS for t in types):
        bad = types if not isinstance(types, list) else next((t for t in types if t not in _KINDS), types)
        raise MQUserError(f"{shown(cfg_path)}: layer_types must list mamba / attention layers, got {bad!r}")
    experts = c.get("num_local_experts", 0) or 0
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 0:
        raise MQUserError(f"{shown(cfg_path)}: num_local_experts must be an integer >= 0, got {experts!r}")
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise MQUserError(f"{shown(cfg_path)}: hidden_act {c['hidden_act']!r} is not supported (silu)")
    pos = c.get("position_embedding_type") or "nope"       # transformers: RoPE only when it says "rope"
    if pos not in ("rope", "nope"):
        raise MQUserError(f"{shown(cfg_path)}: position_embedding_type {pos!r} is not supported (rope, nope)")
    d, eps = c.get("hidden_size"), c.get("rms_norm_eps", 1e-6)
    heads = c.get("num_attention_heads", 32)
    head_dim = d // heads if isinstance(d, int) and isinstance(heads, int) and heads > 0 else None
    bias = json_flag(c, "attention_bias", False, cfg_path)
    try:
        theta = _rope_theta(c)
    except MQUserError as e:
        raise MQUserError(f"{shown(cfg_path)}: {e}") from None
    limits = dt_limit(c.get("time_step_limit"), "time_step_limit", cfg_path)
    mamba = config_for(cfg_path, lambda: mamba2_of(c, d, eps, limits))
    attention = config_for(cfg_path, lambda: AttentionConfig(
        d_model=d, n_heads=heads, n_kv_heads=c.get("num_key_value_heads", heads), head_dim=head_dim,
        qkv_bias=bias, out_bias=bias, rope_dim=head_dim if pos == "rope" else 0, rope_theta=theta,
        scaling=c.get("attention_multiplier", 1.0)))
    if experts:     # GraniteMoeHybridMoE (router top-k, softmax over those k; SwiGLU experts) + shared_mlp
        mlp = config_for(cfg_path, lambda: MoEConfig(
            d_model=d, n_experts=experts, top_k=c.get("num_experts_per_tok", 2), d_ff=c.get("intermediate_size", 1024),
            act="silu", gated=True, router="topk_softmax", shared_d_ff=c.get("shared_intermediate_size", 1024),
            shared_act="silu", shared_gated=True))
    else:
        mlp = config_for(cfg_path, lambda: MLPConfig(d_model=d, d_ff=c.get("shared_intermediate_size", 1024),
                                                     act="silu", gated=True, bias=False))
    layers = paired_layers([_KINDS[t] for t in types], mamba, attention, mlp)
    vocab = c.get("vocab_size", 0)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=d, n_layer=len(layers), vocab_size=vocab, layers=layers, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=c.get("tie_word_embeddings", False), eos_token_id=eos_token(c, vocab),
        embedding_multiplier=c.get("embedding_multiplier", 1.0), residual_multiplier=c.get("residual_multiplier", 1.0),
        logits_scaling=c.get("logits_scaling", 1.0)))
    src, tensors = hf_tensor_source(path, "HF Granite-4.0-H")
    rules = [(r"^model\.embed_tokens\.", "embedding."), (r"^model\.norm\.", "norm_f.")]
    if experts:     # the routed experts under their own names first (rename: the first matching rule wins)
        rules += [(rf"^model\.layers\.{i}\.block_sparse_moe\.", f"layers.{2 * i + 1}.mixer.experts_")
                  for i in range(len(types))]
    rules += paired_rules(len(types), "model", "(mamba|self_attn)", "input_layernorm", "shared_mlp",
                          "post_attention_layernorm")
    gate, up, down = ("shared_gate", "shared_up", "shared_down") if experts else ("gate_proj", "up_proj", "down_proj")
    tensors = tensors.rename(rules).rename([(r"\.mixer\.output_linear\.", f".mixer.{down}.")]).split_rows(
        r"\.mixer\.input_linear\.", [(f".mixer.{gate}.", 0, 2), (f".mixer.{up}.", 1, 2)])
    if experts:
        tensors = ExpertsSource(
            tensors.rename([(r"\.mixer\.experts_router\.layer\.", ".mixer.router.")]),
            flatten=[(r"\.mixer\.experts_output_linear\.weight$", ".mixer.down_proj.weight")],
            split=[(r"\.mixer\.experts_input_linear\.weight$",
                    [(".mixer.gate_proj.weight", 0, 2), (".mixer.up_proj.weight", 1, 2)])])
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors.shapes:
        raise MQUserError(f"{src}: untied head (tie_word_embeddings false) but no lm_head.weight")
    return load_into(cfg, tensors, src, cfg_path), cfg, with_tokenizer(path, {})
