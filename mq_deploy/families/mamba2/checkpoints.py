"""Mamba2's checkpoint formats: HF transformers `Mamba2ForCausalLM` folders (model_type mamba2) and
mamba-ssm folders (`ssm_cfg.layer` Mamba2). Config parsing and key maps only; readers and checks are
mq_deploy.models.loaders'."""

from __future__ import annotations

import math
import os

from mq_deploy.config import MambaLMConfig
from mq_deploy.errors import MQUserError
from mq_deploy.families.mamba2.config import Mamba2Config
from mq_deploy.models.loaders import (
    check_mamba_ssm_backbone,
    config_for,
    eos_token,
    hf_tensor_source,
    json_flag,
    load_into,
    mamba_ssm_tensor_source,
    padded_vocab,
    read_json,
    shown,
    with_tokenizer,
)


def _int(c: dict, key: str, src: str, default=None) -> int:
    v = c.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise MQUserError(f"{shown(src)}: {key} must be an integer, got {v!r}")
    return v


def _json_float(x):
    """A float as transformers 5.x writes one JSON cannot hold: {"__float__": "Infinity"}."""
    if isinstance(x, dict) and set(x) == {"__float__"} and x["__float__"] in ("Infinity", "-Infinity", "NaN"):
        return float(x["__float__"].lower().replace("infinity", "inf"))
    return x


def dt_limit(v, key: str, src: str) -> dict:
    """time_step_limit / dt_limit [lo, hi] (hi infinite: no limit) as the config's dt_min / dt_max."""
    if v is None:
        return {}
    if isinstance(v, (list, tuple)):
        v = [_json_float(x) for x in v]
    if not isinstance(v, (list, tuple)) or len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                              for x in v):
        raise MQUserError(f"{shown(src)}: {key} must be [min, max], got {v!r}")
    lo, hi = float(v[0]), float(v[1])
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo):
        raise MQUserError(f"{shown(src)}: {key} {list(v)} must hold finite limits (max may be infinite)")
    return {"dt_min": lo, "dt_max": None if math.isinf(hi) else hi}


def _check_act(c: dict, key: str, src: str) -> None:
    act = c.get(key, "silu")
    if act not in ("silu", "swish"):
        raise MQUserError(f"{shown(src)}: {key} {act!r} is not supported (Mamba2 uses silu)")


def _mixer_from_hf(c: dict, src: str) -> Mamba2Config:
    _check_act(c, "hidden_act", src)
    hidden, heads, head_dim = _int(c, "hidden_size", src), _int(c, "num_heads", src), _int(c, "head_dim", src, 64)
    d_inner = heads * head_dim
    expand = c.get("expand", 2)
    if isinstance(expand, (int, float)) and not isinstance(expand, bool) and expand * hidden != d_inner:
        raise MQUserError(f"{shown(src)}: hidden_size {hidden} x expand {expand} != num_heads {heads} x head_dim "
                          f"{head_dim}")
    limits = dt_limit(c.get("time_step_limit"), "time_step_limit", src)
    return config_for(src, lambda: Mamba2Config(
        d_model=hidden, d_state=c.get("state_size", 128), d_conv=c.get("conv_kernel", 4),
        expand=max(1, d_inner // hidden), head_dim=head_dim, n_groups=c.get("n_groups", 1), d_inner=d_inner,
        conv_bias=c.get("use_conv_bias", True), bias=c.get("use_bias", False),
        # transformers 5.x: Mamba2RMSNormGated(group_size = d_inner // n_groups), gate before the norm,
        # eps layer_norm_epsilon
        rmsnorm=True, norm_before_gate=False, norm_groups=c.get("n_groups", 1),
        norm_eps=c.get("layer_norm_epsilon", 1e-5), chunk_size=c.get("chunk_size", 256), **limits))


def load_hf(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    mixer = _mixer_from_hf(c, cfg_path)
    vocab = c.get("vocab_size", 0)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=mixer.d_model, n_layer=c.get("num_hidden_layers", 0), vocab_size=vocab, mixer=mixer,
        norm_eps=c.get("layer_norm_epsilon", 1e-5), residual_in_fp32=c.get("residual_in_fp32", True),
        tie_embeddings=c.get("tie_word_embeddings", False), eos_token_id=eos_token(c, vocab)))
    src, tensors = hf_tensor_source(path, "HF Mamba2")
    tensors = tensors.rename([(r"^backbone\.embeddings\.", "embedding."), (r"^backbone\.", "")])
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors.shapes:
        raise MQUserError(f"{src}: untied head (tie_word_embeddings false) but no lm_head.weight")
    return load_into(cfg, tensors, src, cfg_path), cfg, with_tokenizer(path, {})


# mamba-ssm Mamba2 arguments: read, ignored (initialisation and kernels only), refused
_SSM_KNOWN = {"d_state", "d_conv", "expand", "headdim", "ngroups", "rmsnorm", "norm_before_gate", "bias", "conv_bias",
              "chunk_size", "dt_limit", "d_ssm", "D_has_hdim"}
_SSM_IGNORED = {"conv_init", "A_init_range", "dt_min", "dt_max", "dt_init_floor", "use_mem_eff_path", "layer_idx",
                "process_group", "sequence_parallel", "device", "dtype"}


def load_mamba_ssm(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    ssm_cfg = dict(c.get("ssm_cfg") or {})
    ssm_cfg.pop("layer", None)
    check_mamba_ssm_backbone(c, cfg_path)
    unknown = set(ssm_cfg) - _SSM_KNOWN - _SSM_IGNORED
    if unknown:
        raise MQUserError(f"{cfg_path}: unsupported ssm_cfg keys {sorted(unknown)}")
    if json_flag(ssm_cfg, "D_has_hdim", False, cfg_path):
        raise MQUserError(f"{cfg_path}: ssm_cfg.D_has_hdim true (D per channel) is not supported, only D per head")
    d_model = _int(c, "d_model", cfg_path)
    expand = ssm_cfg.get("expand", 2)
    d_inner = expand * d_model if isinstance(expand, int) and not isinstance(expand, bool) else None
    d_ssm = ssm_cfg.get("d_ssm")
    if d_ssm is not None and d_ssm != d_inner:
        raise MQUserError(f"{cfg_path}: ssm_cfg.d_ssm {d_ssm!r} != d_inner {d_inner} (an MLP part inside the mixer, "
                          "d_mlp > 0) is not supported")
    groups = ssm_cfg.get("ngroups", 1)
    limits = dt_limit(ssm_cfg.get("dt_limit"), "ssm_cfg.dt_limit", cfg_path)
    mixer = config_for(cfg_path, lambda: Mamba2Config(
        d_model=d_model, d_state=ssm_cfg.get("d_state", 128), d_conv=ssm_cfg.get("d_conv", 4), expand=expand,
        head_dim=ssm_cfg.get("headdim", 64), n_groups=groups, conv_bias=ssm_cfg.get("conv_bias", True),
        bias=ssm_cfg.get("bias", False), rmsnorm=ssm_cfg.get("rmsnorm", True),
        # mamba-ssm: RMSNormGated(d_ssm, eps=1e-5, norm_before_gate, group_size=d_ssm // ngroups)
        norm_before_gate=ssm_cfg.get("norm_before_gate", False), norm_groups=groups, norm_eps=1e-5,
        chunk_size=ssm_cfg.get("chunk_size", 256), **limits))
    vocab = padded_vocab(c, cfg_path)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=d_model, n_layer=c.get("n_layer", 0), vocab_size=vocab, mixer=mixer,
        norm_eps=c.get("norm_epsilon", 1e-5), residual_in_fp32=c.get("residual_in_fp32", True),
        tie_embeddings=c.get("tie_embeddings", True)))
    src, tensors = mamba_ssm_tensor_source(path)
    if not mixer.rmsnorm:
        for k in [k for k in tensors.shapes if k.endswith(".mixer.norm.weight")]:
            raise MQUserError(f"{shown(src)}: tensor {k} exists but ssm_cfg.rmsnorm is false")
    extra = with_tokenizer(path, {"vocab_size_unpadded": c["vocab_size"]})
    return load_into(cfg, tensors, src, cfg_path), cfg, extra
