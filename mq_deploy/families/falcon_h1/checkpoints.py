"""Falcon-H1 HF folders: config parsing, key map and the muP multipliers. HF layer i is our blocks 2i (a
parallel block: self_attn and mamba on input_layernorm's output, summed) and 2i + 1 (the SwiGLU
feed_forward under pre_ff_layernorm). Readers and checks are mq_deploy.models.loaders'.

transformers' FalconH1 scales with these multipliers, each a constant times a linear layer's input or
output, so the loader folds them exactly into that linear's weights (in float64, once, after loading) and the
recipes see plain linears:
- ssm_in_multiplier (Mamba2 input) and ssm_multipliers (the muP vector over in_proj's output segments z, x,
  B, C, dt; it scales in_proj's bias too): in_proj's rows W <- diag(mup) W ssm_in, b <- diag(mup) b;
- ssm_out_multiplier: out_proj's weight and bias;
- attention_in_multiplier: the input of q_proj, k_proj and v_proj (their weights); key_multiplier: k_proj's
  output (weight and bias, before RoPE, which is linear); attention_out_multiplier: o_proj's weight and bias;
- mlp_multipliers [gate, down]: gate_proj's output (inside the SiLU; weight and bias) and down_proj's
  output (weight and bias).
Two stay model scalars (MambaLMConfig): embedding_multiplier (the embedding can be the tied head) and
lm_head_multiplier (as logits_scaling = 1 / lm_head_multiplier: the head can be the tied embedding).
"""

from __future__ import annotations

import math
import os

import torch

from mq_deploy.config import MambaLMConfig
from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.families.mamba2.checkpoints import dt_limit
from mq_deploy.families.mamba2.config import Mamba2Config
from mq_deploy.families.mlp.config import MLPConfig
from mq_deploy.families.parallel.config import ParallelConfig
from mq_deploy.models.loaders import (
    TensorSource,
    config_for,
    eos_token,
    hf_tensor_source,
    json_flag,
    load_into,
    read_json,
    shown,
    with_tokenizer,
)

_SCALARS = ("attention_in_multiplier", "attention_out_multiplier", "key_multiplier", "ssm_in_multiplier",
            "ssm_out_multiplier", "embedding_multiplier", "lm_head_multiplier")


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def multipliers(c: dict, src: str) -> dict:
    """The muP multipliers of a config (transformers' defaults where absent), each checked."""
    out = {}
    for key in _SCALARS:
        v = c.get(key, 1.0)
        if not _number(v):
            raise MQUserError(f"{shown(src)}: {key} must be a finite number, got {v!r}")
        out[key] = float(v)
    for key, n in (("ssm_multipliers", 5), ("mlp_multipliers", 2)):
        v = c.get(key)
        v = [1.0] * n if v is None else v
        if not isinstance(v, list) or len(v) != n or not all(_number(x) for x in v):
            raise MQUserError(f"{shown(src)}: {key} must list {n} finite numbers, got {v!r}")
        out[key] = [float(x) for x in v]
    if out["lm_head_multiplier"] <= 0:
        raise MQUserError(f"{shown(src)}: lm_head_multiplier {out['lm_head_multiplier']} must be > 0")
    return out


def _int(c: dict, key: str, default, src: str) -> int:
    v = c.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MQUserError(f"{shown(src)}: {key} must be a positive integer, got {v!r}")
    return v


def _mamba(c: dict, d: int, eps, src: str) -> Mamba2Config:
    d_ssm = c.get("mamba_d_ssm")
    if d_ssm is None:
        d_ssm = _int(c, "mamba_expand", 2, src) * d
    d_ssm = _int({"mamba_d_ssm": d_ssm}, "mamba_d_ssm", None, src)
    heads = _int(c, "mamba_n_heads", 128, src)
    head_dim = c.get("mamba_d_head", "auto")
    if head_dim == "auto":
        head_dim = d_ssm // heads
    head_dim = _int({"mamba_d_head": head_dim}, "mamba_d_head", None, src)
    if heads * head_dim != d_ssm:
        raise MQUserError(f"{shown(src)}: mamba_n_heads {heads} x mamba_d_head {head_dim} != mamba_d_ssm {d_ssm}")
    groups = c.get("mamba_n_groups", 1)
    in_bias = json_flag(c, "mamba_proj_bias", False, src)
    out_bias = json_flag(c, "projectors_bias", False, src)
    conv_bias = json_flag(c, "mamba_conv_bias", True, src)
    rmsnorm = json_flag(c, "mamba_rms_norm", False, src)
    before_gate = json_flag(c, "mamba_norm_before_gate", True, src)
    limits = dt_limit(c.get("time_step_limit"), "time_step_limit", src)
    return config_for(src, lambda: Mamba2Config(
        d_model=d, d_state=c.get("mamba_d_state", 256), d_conv=c.get("mamba_d_conv", 4),
        expand=max(1, d_ssm // d), head_dim=head_dim, n_groups=groups, d_inner=d_ssm, conv_bias=conv_bias,
        bias=in_bias or out_bias,            # the one without a bias in the file reads zeros (_ZeroBiases)
        # FalconH1RMSNormGated: groups of d_ssm / n_groups channels, eps rms_norm_eps; the norm is optional
        # (mamba_rms_norm; without it y * silu(z)) and applies the gate after it by default
        rmsnorm=rmsnorm, norm_before_gate=before_gate, norm_groups=groups, norm_eps=eps,
        chunk_size=c.get("mamba_chunk_size", 256), **limits))


def _attention(c: dict, d: int, src: str) -> AttentionConfig:
    heads = _int(c, "num_attention_heads", 32, src)
    kv = c.get("num_key_value_heads")
    head_dim = c.get("head_dim") or d // heads
    params = c.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise MQUserError(f"{shown(src)}: rope_parameters must be an object, got {params!r}")
    if params.get("rope_type", "default") != "default":
        raise MQUserError(f"{shown(src)}: rope_parameters.rope_type {params['rope_type']!r} is not supported "
                          "(default RoPE only)")
    legacy = c.get("rope_scaling")          # configs written before rope_parameters
    if legacy is not None and (not isinstance(legacy, dict)
                               or legacy.get("rope_type", legacy.get("type", "default")) != "default"):
        raise MQUserError(f"{shown(src)}: rope_scaling {legacy!r} is not supported (default RoPE only)")
    bias = json_flag(c, "attention_bias", False, src)
    # transformers' FalconH1 rotates every dimension of a head (partial_rotary_factor is not read)
    return config_for(src, lambda: AttentionConfig(
        d_model=d, n_heads=heads, n_kv_heads=heads if kv is None else kv, head_dim=head_dim, qkv_bias=bias,
        out_bias=bias, rope_dim=head_dim if isinstance(head_dim, int) else None,
        rope_theta=params.get("rope_theta", c.get("rope_theta", 10000.0))))


class _ZeroBiases(TensorSource):
    """The base tensors plus zero biases where our Mamba2 mixer has one and the file has not (Falcon-H1 sets
    in_proj's bias, mamba_proj_bias, apart from out_proj's, projectors_bias; ours has both or neither)."""

    def __init__(self, base: TensorSource, zeros: dict, origin: str):
        super().__init__()
        self.base, self.zeros = base, zeros
        self.shapes, self.dtypes, self.origin = dict(base.shapes), dict(base.dtypes), dict(base.origin)
        for k, shape in zeros.items():
            self.shapes[k], self.dtypes[k], self.origin[k] = shape, "F32", origin

    def get(self, name):
        return torch.zeros(self.zeros[name]) if name in self.zeros else self.base.get(name)


def _rules(n: int) -> list:
    rules = [(r"^model\.embed_tokens\.", "embedding."), (r"^model\.final_layernorm\.", "norm_f.")]
    for i in range(n):
        rules += [(rf"^model\.layers\.{i}\.input_layernorm\.", f"layers.{2 * i}.norm."),
                  (rf"^model\.layers\.{i}\.(self_attn|mamba)\.", rf"layers.{2 * i}.mixer.\1."),
                  (rf"^model\.layers\.{i}\.pre_ff_layernorm\.", f"layers.{2 * i + 1}.norm."),
                  (rf"^model\.layers\.{i}\.feed_forward\.", f"layers.{2 * i + 1}.mixer.")]
    return rules


def _scale(t, factor) -> None:
    """t <- t * factor in float64 (factor a number or a vector over t's rows); None: no such tensor."""
    if t is None:
        return
    f = torch.as_tensor(factor, dtype=torch.float64)
    f = f.reshape([-1] + [1] * (t.dim() - 1)) if f.dim() else f
    with torch.no_grad():
        t.copy_((t.detach().double() * f).to(t.dtype))


def mup_vector(m: Mamba2Config, ssm_multipliers) -> torch.Tensor:
    """transformers' compute_mup_vector: one factor per in_proj output row, by segment [z, x, B, C, dt]."""
    gn = m.n_groups * m.d_state
    sizes = [m.d_inner, m.d_inner, gn, gn, m.n_heads]
    return torch.cat([torch.full((n,), float(s), dtype=torch.float64) for n, s in zip(sizes, ssm_multipliers)])


def fold_multipliers(model, mult: dict) -> None:
    """Every multiplier that scales a linear's input or output, folded into that linear (module doc)."""
    for layer, mlp in zip(model.layers[0::2], model.layers[1::2]):
        attn, mamba = layer.mixer.self_attn, layer.mixer.mamba
        mup = mup_vector(mamba.cfg, mult["ssm_multipliers"])
        _scale(mamba.in_proj.weight, mup * mult["ssm_in_multiplier"])
        _scale(mamba.in_proj.bias, mup)
        for t in (mamba.out_proj.weight, mamba.out_proj.bias):
            _scale(t, mult["ssm_out_multiplier"])
        a_in, key = mult["attention_in_multiplier"], mult["key_multiplier"]
        _scale(attn.q_proj.weight, a_in)
        _scale(attn.v_proj.weight, a_in)
        _scale(attn.k_proj.weight, a_in * key)
        _scale(attn.k_proj.bias, key)
        for t in (attn.o_proj.weight, attn.o_proj.bias):
            _scale(t, mult["attention_out_multiplier"])
        gate, down = mult["mlp_multipliers"]
        for t in (mlp.mixer.gate_proj.weight, mlp.mixer.gate_proj.bias):
            _scale(t, gate)
        for t in (mlp.mixer.down_proj.weight, mlp.mixer.down_proj.bias):
            _scale(t, down)


def load_hf(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    n = _int(c, "num_hidden_layers", None, cfg_path)
    types = c.get("layers_block_type", c.get("layer_types"))
    if types is not None and (not isinstance(types, list) or len(types) != n or any(t != "hybrid" for t in types)):
        bad = next((t for t in types if t != "hybrid"), types) if isinstance(types, list) and len(types) == n else types
        raise MQUserError(f"{shown(cfg_path)}: layers_block_type entry {bad!r}: every Falcon-H1 layer is 'hybrid' "
                          "(attention and Mamba2 in parallel)")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise MQUserError(f"{shown(cfg_path)}: hidden_act {act!r} is not supported (silu)")
    d = _int(c, "hidden_size", None, cfg_path)
    eps = c.get("rms_norm_eps", 1e-5)
    mult = multipliers(c, cfg_path)
    attention, mamba = _attention(c, d, cfg_path), _mamba(c, d, eps, cfg_path)
    block = config_for(cfg_path, lambda: ParallelConfig(d_model=d, attention=attention, mamba=mamba))
    mlp_bias = json_flag(c, "mlp_bias", False, cfg_path)
    tied = json_flag(c, "tie_word_embeddings", False, cfg_path)
    mlp = config_for(cfg_path, lambda: MLPConfig(d_model=d, d_ff=c.get("intermediate_size", 14336), act="silu",
                                                 gated=True, bias=mlp_bias))
    vocab = c.get("vocab_size", 0)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=d, n_layer=2 * n, vocab_size=vocab, layers=[block, mlp] * n, norm_eps=eps, residual_in_fp32=False,
        tie_embeddings=tied, eos_token_id=eos_token(c, vocab),
        embedding_multiplier=mult["embedding_multiplier"], logits_scaling=1.0 / mult["lm_head_multiplier"]))
    src, tensors = hf_tensor_source(path, "HF Falcon-H1")
    tensors = tensors.rename(_rules(n))
    flags = {"in_proj": json_flag(c, "mamba_proj_bias", False, cfg_path),
             "out_proj": json_flag(c, "projectors_bias", False, cfg_path)}
    m = block.mamba
    if m.bias and not all(flags.values()):
        shapes = {"in_proj": (m.d_inner + m.conv_dim + m.n_heads,), "out_proj": (d,)}
        zeros = {f"layers.{2 * i}.mixer.mamba.{p}.bias": shapes[p] for i in range(n) for p in shapes if not flags[p]}
        extra = next((k for k in zeros if k in tensors.shapes), None)
        if extra is not None:
            raise MQUserError(f"{shown(tensors.origin[extra])}: tensor {extra} exists but the config says no such "
                              "bias (mamba_proj_bias / projectors_bias false)")
        tensors = _ZeroBiases(tensors, zeros, src)
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors.shapes:
        raise MQUserError(f"{src}: untied head (tie_word_embeddings false) but no lm_head.weight")
    model = load_into(cfg, tensors, src, cfg_path)
    fold_multipliers(model, mult)
    return model, cfg, with_tokenizer(path, {})
