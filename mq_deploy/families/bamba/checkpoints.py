"""Bamba HF folders: config parsing and key map (HF layer i: our blocks 2i, its mixer under input_layernorm,
and 2i + 1, its feed_forward under pre_ff_layernorm)."""

from __future__ import annotations

import os

from mq_deploy.config import MambaLMConfig
from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.families.granite_h.checkpoints import mamba2_of, paired_layers, paired_rules
from mq_deploy.families.mamba2.checkpoints import dt_limit
from mq_deploy.families.mlp.config import MLPConfig
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


def load_hf(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    n = c.get("num_hidden_layers")
    attn = c.get("attn_layer_indices") or []
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise MQUserError(f"{shown(cfg_path)}: num_hidden_layers must be a positive integer, got {n!r}")
    if not isinstance(attn, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n for i in attn):
        raise MQUserError(f"{shown(cfg_path)}: attn_layer_indices must list layers in [0, {n}), got {attn!r}")
    if c.get("num_experts", 1) != 1:
        raise MQUserError(f"{shown(cfg_path)}: num_experts {c.get('num_experts')!r}: MoE feed-forwards are not "
                          "supported yet")
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise MQUserError(f"{shown(cfg_path)}: hidden_act {c['hidden_act']!r} is not supported (silu)")
    d, eps = c.get("hidden_size"), c.get("rms_norm_eps", 1e-5)
    heads = c.get("num_attention_heads", 32)
    head_dim = c.get("head_dim") or (d // heads if isinstance(d, int) and isinstance(heads, int) and heads > 0
                                     else None)
    params = c.get("rope_parameters") or {}
    if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
        raise MQUserError(f"{shown(cfg_path)}: rope_parameters {params!r}: only default RoPE is supported")
    factor = params.get("partial_rotary_factor", 1.0)
    rope_dim = int(head_dim * factor) if isinstance(head_dim, int) and isinstance(factor, (int, float)) else None
    bias = json_flag(c, "attention_bias", False, cfg_path)
    limits = dt_limit(c.get("time_step_limit"), "time_step_limit", cfg_path)
    mamba = config_for(cfg_path, lambda: mamba2_of(c, d, eps, limits))
    attention = config_for(cfg_path, lambda: AttentionConfig(
        d_model=d, n_heads=heads, n_kv_heads=c.get("num_key_value_heads", heads), head_dim=head_dim,
        qkv_bias=bias, out_bias=bias, rope_dim=rope_dim, rope_theta=params.get("rope_theta", 10000.0)))
    mlp = config_for(cfg_path, lambda: MLPConfig(d_model=d, d_ff=c.get("intermediate_size", 1024), act="silu",
                                                 gated=True, bias=json_flag(c, "mlp_bias", False, cfg_path)))
    layers = paired_layers(["attention" if i in attn else "mamba2" for i in range(n)], mamba, attention, mlp)
    vocab = c.get("vocab_size", 0)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=d, n_layer=len(layers), vocab_size=vocab, layers=layers, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=c.get("tie_word_embeddings", False), eos_token_id=eos_token(c, vocab)))
    src, tensors = hf_tensor_source(path, "HF Bamba")
    rules = [(r"^model\.embed_tokens\.", "embedding."), (r"^model\.final_layernorm\.", "norm_f.")]
    rules += paired_rules(n, "model", "(mamba|self_attn)", "input_layernorm", "feed_forward", "pre_ff_layernorm")
    tensors = tensors.rename(rules)
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors.shapes:
        raise MQUserError(f"{src}: untied head (tie_word_embeddings false) but no lm_head.weight")
    return load_into(cfg, tensors, src, cfg_path), cfg, with_tokenizer(path, {})
