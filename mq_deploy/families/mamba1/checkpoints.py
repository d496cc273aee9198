"""Mamba1's checkpoint formats: HF transformers Mamba and FalconMamba folders, mamba-ssm folders
(`ssm_cfg.layer` Mamba1 or absent) and hustvl's Vision Mamba `.pth` files. Config parsing and key maps
only: the readers and checks are mq_deploy.models.loaders'."""

from __future__ import annotations

import argparse
import math
import os
import re

import torch

from mq_deploy.config import MambaLMConfig, VimConfig
from mq_deploy.errors import MQUserError, note
from mq_deploy.families.mamba1.config import MixerConfig
from mq_deploy.models.loaders import (
    DictSource,
    check_mamba_ssm_backbone,
    config_for,
    eos_token,
    find_pth,
    hf_tensor_source,
    layer_count,
    load_into,
    mamba_ssm_tensor_source,
    padded_vocab,
    read_json,
    read_torch_pickle,
    with_tokenizer,
)


def _hf_mixer_cfg(c: dict, src: str, falcon: bool) -> MixerConfig:
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise MQUserError(f"{src}: hidden_act {c['hidden_act']!r} is not supported (Mamba1 uses silu)")
    hidden = c.get("hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int):
        raise MQUserError(f"{src}: hidden_size missing or not an integer")
    return config_for(src, lambda: MixerConfig(
        d_model=hidden, d_state=c.get("state_size", 16), d_conv=c.get("conv_kernel", 4), expand=c.get("expand", 2),
        d_inner=c.get("intermediate_size"), dt_rank=c.get("time_step_rank", "auto"),
        conv_bias=c.get("use_conv_bias", True), bias=c.get("use_bias", False),
        mixer_rms_eps=c.get("mixer_rms_eps", 1e-6) if falcon else None))


def load_hf(path, falcon=False):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    mixer = _hf_mixer_cfg(c, cfg_path, falcon)
    vocab = c.get("vocab_size", 0)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=mixer.d_model, n_layer=c.get("num_hidden_layers", 0), vocab_size=vocab, mixer=mixer,
        norm_eps=c.get("layer_norm_epsilon", 1e-5), residual_in_fp32=c.get("residual_in_fp32", True),
        tie_embeddings=c.get("tie_word_embeddings", True), eos_token_id=eos_token(c, vocab)))
    src, tensors = hf_tensor_source(path, "HF Mamba")
    tensors = tensors.rename([(r"^backbone\.embeddings\.", "embedding."), (r"^backbone\.", "")])
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors.shapes:
        raise MQUserError(f"{src}: untied head (tie_word_embeddings false) but no lm_head.weight")
    return load_into(cfg, tensors, src, cfg_path), cfg, with_tokenizer(path, {})


def load_mamba_ssm(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    ssm_cfg = c.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise MQUserError(f"{cfg_path}: ssm_cfg must be an object")
    ssm_cfg = dict(ssm_cfg)
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise MQUserError(f"{cfg_path}: ssm_cfg.layer {layer!r} is not supported (only Mamba1)")
    check_mamba_ssm_backbone(c, cfg_path)
    known = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias"}
    ignored = {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
    unknown = set(ssm_cfg) - known - ignored
    if unknown:
        raise MQUserError(f"{cfg_path}: unsupported ssm_cfg keys {sorted(unknown)}")
    d_model = c["d_model"]
    kw = {k: v for k, v in ssm_cfg.items() if k in known}
    mixer = config_for(cfg_path, lambda: MixerConfig(d_model=d_model, **kw))
    vocab = padded_vocab(c, cfg_path)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=d_model, n_layer=c["n_layer"], vocab_size=vocab, mixer=mixer, norm_eps=c.get("norm_epsilon", 1e-5),
        residual_in_fp32=c.get("residual_in_fp32", True), tie_embeddings=c.get("tie_embeddings", True)))
    src, tensors = mamba_ssm_tensor_source(path)
    extra = with_tokenizer(path, {"vocab_size_unpadded": c["vocab_size"]})
    return load_into(cfg, tensors, src, cfg_path), cfg, extra


def _vim_config_from_state_dict(shapes: dict, overrides: dict, src: str, cfg_src: str | None) -> VimConfig:
    try:
        d_model, in_chans, patch, _ = shapes["patch_embed.proj.weight"]
        n_layer = layer_count(shapes)
        di, n = shapes["layers.0.mixer.A_log"]
        dt_rank = shapes["layers.0.mixer.dt_proj.weight"][1]
        d_conv = shapes["layers.0.mixer.conv1d.weight"][-1]
        num_classes = shapes["head.weight"][0]
        num_tokens = shapes["pos_embed"][1]
    except (KeyError, ValueError, IndexError) as e:
        raise MQUserError(f"{src}: not a Vision Mamba state dict (missing or misshapen {e})") from None
    if "cls_token" not in shapes:
        raise MQUserError(f"{src}: Vim without a class token is not supported")
    if any(k.startswith(("cls_token_head", "cls_token_tail")) or k.endswith(".gamma") for k in shapes):
        raise MQUserError(f"{src}: double class tokens / layer scale are not supported")
    if "layers.0.mixer.A_b_log" not in shapes or "layers.0.mixer.conv1d_b.weight" not in shapes:
        raise MQUserError(f"{src}: only bimamba v2 Vim checkpoints are supported")
    if "layers.0.norm.bias" in shapes:
        raise MQUserError(f"{src}: LayerNorm Vim (rms_norm false) is not supported")
    grid = math.isqrt(num_tokens - 1) if num_tokens >= 1 else 0
    if grid * grid != num_tokens - 1:
        raise MQUserError(f"{src}: pos_embed has {num_tokens} tokens, not a square grid plus one class token")
    stride = overrides.get("stride")
    if stride is None:
        stride = _default_stride(src, patch, grid, overrides.get("img_size"))
    if isinstance(stride, bool) or not isinstance(stride, int) or stride <= 0:
        raise MQUserError(f"{cfg_src or src}: stride must be a positive integer, got {stride!r}")
    img_size = overrides.get("img_size", (grid - 1) * stride + patch)
    mixer = config_for(cfg_src or src, lambda: MixerConfig(
        d_model=d_model, d_state=n, d_conv=d_conv, d_inner=di, expand=max(1, di // d_model), dt_rank=dt_rank,
        conv_bias="layers.0.mixer.conv1d.bias" in shapes, bias="layers.0.mixer.in_proj.bias" in shapes,
        bimamba=True))
    kw = {k: overrides[k] for k in ("image_mean", "image_std", "norm_eps", "residual_in_fp32") if k in overrides}
    cfg = config_for(cfg_src or src, lambda: VimConfig(
        d_model=d_model, n_layer=n_layer, num_classes=num_classes, img_size=img_size, patch_size=patch,
        stride=stride, in_chans=in_chans, mixer=mixer, **kw))
    if cfg.num_patches + 1 != num_tokens:
        raise MQUserError(f"{src}: pos_embed has {num_tokens} tokens, img_size {img_size} with patch {patch} "
                          f"and stride {stride} gives {cfg.num_patches + 1}")
    return cfg


def _default_stride(src, patch: int, grid: int, img_size) -> int:
    """The stride when nothing states it: the one that puts the patch grid on the image size when that is
    known, else on hustvl's 224 px (the "+" models are 224 px at stride 8, which a file without `args` only
    shows by its grid: 27 x 27 for patch 16), else the patch size."""
    size = img_size if isinstance(img_size, int) and not isinstance(img_size, bool) else 224
    if grid > 1 and (size - patch) % (grid - 1) == 0 and 0 < (size - patch) // (grid - 1) <= patch:
        stride = (size - patch) // (grid - 1)
        if stride != patch and img_size is None:
            note(f"{src}: a {grid}x{grid} patch grid with patch {patch} and no stride given: taken as {size} px "
                 f"at stride {stride} (hustvl's \"+\" models); a config.json with img_size and stride beside the "
                 ".pth says otherwise")
        return stride
    return patch


def _vim_args(ckpt) -> dict:
    """Normalisation and size from the training args hustvl/DeiT store beside the weights, where present."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    out = {}
    for ours, theirs in (("image_mean", "mean"), ("image_std", "std"), ("image_mean", "image_mean"),
                         ("image_std", "image_std"), ("img_size", "input_size")):
        v = args.get(theirs)
        if v is not None and ours not in out:
            out[ours] = tuple(v) if isinstance(v, (list, tuple)) else v
    # the "+" models say their stride only in their name: vim_tiny_patch16_stride8_224_bimambav2_...
    m = re.search(r"stride(\d+)", str(args.get("model", "")))
    if m:
        out["stride"] = int(m.group(1))
    return out


def load_vim(path):
    overrides, cfg_path = {}, None
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if os.path.lexists(cfg_path):
            c = read_json(cfg_path)
            overrides = {"img_size": c.get("img_size"), "stride": c.get("stride"),
                         "image_mean": c.get("image_mean"), "image_std": c.get("image_std"),
                         "norm_eps": c.get("norm_epsilon")}
            overrides = {k: v for k, v in overrides.items() if v is not None}
        else:
            cfg_path = None
        src = find_pth(path)
        if src is None:
            raise MQUserError(f"{path}: Vim directory without a .pth checkpoint")
    else:
        src = path
    ckpt = read_torch_pickle(src)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        sd = ckpt["model"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        sd = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    else:
        raise MQUserError(f"{src}: expected a state dict or a dict with a 'model' entry")
    overrides = {**_vim_args(ckpt), **overrides}     # a config.json beside the .pth wins over the saved args
    tensors = DictSource(dict(sd), src).rename([(r"^module\.", "")])
    cfg = _vim_config_from_state_dict(tensors.shapes, overrides, src, cfg_path)
    return load_into(cfg, tensors, src, cfg_path), cfg, {}


def load_hf_falcon(path):
    return load_hf(path, falcon=True)
