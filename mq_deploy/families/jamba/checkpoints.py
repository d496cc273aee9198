"""Jamba HF folders: config parsing (the layer periods) and key map. HF layer i is our blocks 2i (its mamba
or self_attn under input_layernorm) and 2i + 1 (its feed_forward under pre_ff_layernorm); the experts of a
sparse feed-forward are stored one tensor per expert (or fused gate_up_proj / down_proj). Readers and
checks are mq_deploy.models.loaders'."""

from __future__ import annotations

import os

from mq_deploy.config import MambaLMConfig
from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.families.granite_h.checkpoints import paired_rules
from mq_deploy.families.mamba1.config import MixerConfig
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


def _positive_int(c, key, default, src, lo=1):
    v = c.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise MQUserError(f"{shown(src)}: {key} must be an integer >= {lo}, got {v!r}")
    return v


def layer_kinds(c: dict, src: str) -> list:
    """[(mixer kind, feed-forward kind)] per HF layer, as JambaConfig.layers_block_type and
    layers_num_experts compute them."""
    n = _positive_int(c, "num_hidden_layers", 32, src)
    periods = {}
    for what, period, offset in (("attn", 8, 4), ("expert", 2, 1)):
        p = _positive_int(c, f"{what}_layer_period", period, src)
        o = _positive_int(c, f"{what}_layer_offset", offset, src, lo=0)
        if o >= p:
            raise MQUserError(f"{shown(src)}: {what}_layer_offset {o} must be smaller than {what}_layer_period {p}")
        periods[what] = (p, o)
    experts = _positive_int(c, "num_experts", 16, src)
    (ap, ao), (ep, eo) = periods["attn"], periods["expert"]
    return [("attention" if i % ap == ao else "mamba1", "moe" if experts > 1 and i % ep == eo else "mlp")
            for i in range(n)]


def load_hf(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    kinds = layer_kinds(c, cfg_path)
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise MQUserError(f"{shown(cfg_path)}: hidden_act {c['hidden_act']!r} is not supported (silu)")
    d, eps = c.get("hidden_size"), c.get("rms_norm_eps", 1e-6)
    heads = c.get("num_attention_heads", 32)
    head_dim = c.get("head_dim") or (d // heads if isinstance(d, int) and isinstance(heads, int) and heads > 0
                                     else None)
    d_ff = c.get("intermediate_size", 14336)
    blocks = {
        "mamba1": lambda: MixerConfig(
            d_model=d, d_state=c.get("mamba_d_state", 16), d_conv=c.get("mamba_d_conv", 4),
            expand=c.get("mamba_expand", 2), dt_rank=c.get("mamba_dt_rank", "auto"),
            conv_bias=json_flag(c, "mamba_conv_bias", True, cfg_path),
            bias=json_flag(c, "mamba_proj_bias", False, cfg_path), mixer_rms_eps=eps, inner_norm_weights=True),
        "attention": lambda: AttentionConfig(
            d_model=d, n_heads=heads, n_kv_heads=c.get("num_key_value_heads", heads), head_dim=head_dim,
            rope_dim=0),                                       # Jamba's attention has no positional encoding
        "mlp": lambda: MLPConfig(d_model=d, d_ff=d_ff, act="silu", gated=True, bias=False),
        "moe": lambda: MoEConfig(d_model=d, n_experts=c.get("num_experts", 16), top_k=c.get("num_experts_per_tok", 2),
                                 d_ff=d_ff, act="silu", gated=True, router="softmax"),
    }
    made = {}

    def block(kind):
        if kind not in made:
            made[kind] = config_for(cfg_path, blocks[kind])
        return made[kind]

    layers = [block(k) for pair in kinds for k in pair]
    vocab = c.get("vocab_size", 0)
    tied = json_flag(c, "tie_word_embeddings", False, cfg_path)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=d, n_layer=len(layers), vocab_size=vocab, layers=layers, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=tied, eos_token_id=eos_token(c, vocab)))
    src, tensors = hf_tensor_source(path, "HF Jamba")
    rules = [(r"^model\.embed_tokens\.", "embedding."), (r"^model\.final_layernorm\.", "norm_f.")]
    rules += paired_rules(len(kinds), "model", "(mamba|self_attn)", "input_layernorm", "feed_forward",
                          "pre_ff_layernorm")
    tensors = ExpertsSource(
        tensors.rename(rules),
        stack=[(r"^(?P<pre>layers\.\d+\.mixer\.)experts\.(?P<e>\d+)\.(?P<p>gate_proj|up_proj|down_proj)\.weight$",
                r"\g<pre>\g<p>.weight")],
        flatten=[(r"^(layers\.\d+\.mixer\.)experts\.down_proj$", r"\1down_proj.weight")],
        split=[(r"^(layers\.\d+\.mixer\.)experts\.gate_up_proj$",
                [(r"\1gate_proj.weight", 0, 2), (r"\1up_proj.weight", 1, 2)])])
    if tied:
        tensors.drop("lm_head.weight")
    elif "lm_head.weight" not in tensors.shapes:
        raise MQUserError(f"{src}: untied head (tie_word_embeddings false) but no lm_head.weight")
    return load_into(cfg, tensors, src, cfg_path), cfg, with_tokenizer(path, {})
