"""Checkpoint loaders. The format is detected from what the path holds:

| format      | what is there                                                                 |
|-------------|-------------------------------------------------------------------------------|
| mq-deploy   | config.json with "mq_deploy_format" + model.safetensors                       |
| hf-mamba    | config.json with model_type "mamba" + model.safetensors (or a sharded index) |
| mamba-ssm   | config.json with d_model/n_layer/vocab_size + pytorch_model.bin               |
| vim         | a .pth/.pt file (hustvl/Vim: {"model": state_dict, ...}), or a folder with one|

This module is the only place that knows other projects' parameter names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass

import torch

from mq_deploy.config import MambaLMConfig, MixerConfig, VimConfig, config_from_dict
from mq_deploy.errors import MQUserError
from mq_deploy.models.io import FORMAT_KEY, build_model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    format: str
    path: str
    config: object
    extra: dict

    @property
    def architecture(self) -> str:
        return self.config.architecture


# --- raw readers -----------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise MQUserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise MQUserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(d, dict):
        raise MQUserError(f"{path}: expected a JSON object")
    return d


def read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MQUserError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _read_sharded_safetensors(directory: str, index_name: str) -> dict:
    index = _read_json(os.path.join(directory, index_name))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MQUserError(f"{os.path.join(directory, index_name)}: no weight_map")
    sd = {}
    for shard in sorted(set(weight_map.values())):
        sd.update(read_safetensors(os.path.join(directory, shard)))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise MQUserError(f"{directory}: tensors listed in {index_name} are in no shard: {missing[:5]}")
    return sd


def read_torch_pickle(path: str):
    """torch.load with weights_only=True; argparse.Namespace (Vim/DeiT save their args) is allowed."""
    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise MQUserError(f"{path}: refused to unpickle (only tensors and plain containers are loaded "
                          f"with weights_only=True): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise MQUserError(f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0]})") from None


# --- detection -------------------------------------------------------------------------------------

def detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise MQUserError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith((".pth", ".pt", ".bin")):
            return "vim"
        raise MQUserError(f"{path}: a model is a checkpoint directory or a Vim .pth file")
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        cfg = _read_json(cfg_path)
        if FORMAT_KEY in cfg:
            return "mq-deploy"
        if cfg.get("model_type") == "mamba" or "MambaForCausalLM" in (cfg.get("architectures") or []):
            return "hf-mamba"
        if cfg.get("model_type"):
            raise MQUserError(f"{cfg_path}: unsupported model_type {cfg['model_type']!r} "
                              "(supported: Mamba1 causal LMs and Vision Mamba)")
        if {"d_model", "n_layer", "vocab_size"} <= set(cfg):
            return "mamba-ssm"
        if _find_pth(path):   # Vim: the .pth holds the weights, config.json only img_size/stride/normalisation
            return "vim"
        raise MQUserError(f"{cfg_path}: cannot tell which model format this is "
                          "(not mq-deploy, HF transformers Mamba, mamba-ssm or Vim)")
    if _find_pth(path):
        return "vim"
    raise MQUserError(f"{path}: no config.json and no .pth checkpoint in this directory")


def _find_pth(directory: str):
    cands = sorted(f for f in os.listdir(directory) if f.endswith((".pth", ".pt")))
    if len(cands) > 1:
        raise MQUserError(f"{directory}: several checkpoints ({', '.join(cands)}); name one file")
    return os.path.join(directory, cands[0]) if cands else None


# --- state dict checks -----------------------------------------------------------------------------

def _load_into(model, sd: dict, source: str, ignore_missing=()):
    expected = model.state_dict()
    tied = getattr(model.cfg, "tie_embeddings", False)
    if tied:
        expected.pop("lm_head.weight", None)
        sd.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in sd and k not in ignore_missing]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise MQUserError(f"{source}: state dict does not match its config: " + "; ".join(parts))
    for k, v in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise MQUserError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, "
                              f"the config implies {tuple(v.shape)}")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise MQUserError(f"{source}: tensor {k} holds NaN or Inf")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)
    if tied:
        model.lm_head.weight = model.embedding.weight
    return model


def _rename(sd: dict, rules) -> dict:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k2, n = re.subn(pat, rep, k)
            if n:
                k = k2
                break
        out[k] = v
    return out


# --- formats ---------------------------------------------------------------------------------------

def _load_ours(path):
    raw = _read_json(os.path.join(path, "config.json"))
    extra = raw.pop("extra", {}) or {}
    quant = raw.pop("quant", None)
    raw.pop(FORMAT_KEY, None)
    raw.pop("mq_deploy_version", None)
    cfg = config_from_dict(raw)
    model = build_model(cfg)
    if quant is not None:
        # a quantized checkpoint (mq_deploy.quant.qcheckpoint) carries the transforms' runtime buffers
        extra = {**extra, "quant": quant}
        _add_transform_buffers(model, quant)
    sd = read_safetensors(os.path.join(path, "model.safetensors"))
    model = _load_into(model, sd, os.path.join(path, "model.safetensors"))
    return model, cfg, extra


def _add_transform_buffers(model, quant: dict):
    di = model.cfg.mixer.d_inner
    for layer in model.layers:
        if quant.get("online_out_rotation"):
            layer.mixer.register_buffer("out_rotation", torch.zeros(di, di))
        if quant.get("gate_scale"):
            layer.mixer.register_buffer("gate_scale", torch.zeros(di))


def _hf_mixer_cfg(c: dict, src: str) -> MixerConfig:
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise MQUserError(f"{src}: hidden_act {c['hidden_act']!r} is not supported (Mamba1 uses silu)")
    hidden = c.get("hidden_size")
    if not isinstance(hidden, int):
        raise MQUserError(f"{src}: hidden_size missing or not an integer")
    return MixerConfig(d_model=hidden, d_state=c.get("state_size", 16), d_conv=c.get("conv_kernel", 4),
                       expand=c.get("expand", 2), d_inner=c.get("intermediate_size"),
                       dt_rank=c.get("time_step_rank", "auto"), conv_bias=c.get("use_conv_bias", True),
                       bias=c.get("use_bias", False))


def _load_hf(path):
    cfg_path = os.path.join(path, "config.json")
    c = _read_json(cfg_path)
    mixer = _hf_mixer_cfg(c, cfg_path)
    cfg = MambaLMConfig(d_model=mixer.d_model, n_layer=c.get("num_hidden_layers", 0),
                        vocab_size=c.get("vocab_size", 0), mixer=mixer,
                        norm_eps=c.get("layer_norm_epsilon", 1e-5),
                        residual_in_fp32=c.get("residual_in_fp32", True),
                        tie_embeddings=c.get("tie_word_embeddings", True))
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        src = os.path.join(path, "model.safetensors")
        sd = read_safetensors(src)
    elif os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        src = path
        sd = _read_sharded_safetensors(path, "model.safetensors.index.json")
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        src = os.path.join(path, "pytorch_model.bin")
        sd = read_torch_pickle(src)
    else:
        raise MQUserError(f"{path}: HF Mamba directory without model.safetensors, its index, or pytorch_model.bin")
    sd = _rename(sd, [(r"^backbone\.embeddings\.", "embedding."), (r"^backbone\.", "")])
    if not cfg.tie_embeddings and "lm_head.weight" not in sd:
        raise MQUserError(f"{src}: untied head (tie_word_embeddings false) but no lm_head.weight")
    return _load_into(build_model(cfg), sd, src), cfg, {}


def _load_mamba_ssm(path):
    cfg_path = os.path.join(path, "config.json")
    c = _read_json(cfg_path)
    ssm_cfg = dict(c.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise MQUserError(f"{cfg_path}: ssm_cfg.layer {layer!r} is not supported (only Mamba1)")
    if c.get("attn_layer_idx"):
        raise MQUserError(f"{cfg_path}: hybrid attention layers (attn_layer_idx) are not supported")
    if c.get("d_intermediate", 0):
        raise MQUserError(f"{cfg_path}: MLP blocks (d_intermediate > 0) are not supported")
    if not c.get("rms_norm", True):
        raise MQUserError(f"{cfg_path}: LayerNorm models (rms_norm false) are not supported, only RMSNorm")
    known = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias"}
    ignored = {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
    unknown = set(ssm_cfg) - known - ignored
    if unknown:
        raise MQUserError(f"{cfg_path}: unsupported ssm_cfg keys {sorted(unknown)}")
    d_model = c["d_model"]
    mixer = MixerConfig(d_model=d_model, **{k: v for k, v in ssm_cfg.items() if k in known})
    vocab = c["vocab_size"]
    pad = c.get("pad_vocab_size_multiple", 1) or 1
    if vocab % pad:
        vocab += pad - vocab % pad
    cfg = MambaLMConfig(d_model=d_model, n_layer=c["n_layer"], vocab_size=vocab, mixer=mixer,
                        norm_eps=c.get("norm_epsilon", 1e-5), residual_in_fp32=c.get("residual_in_fp32", True),
                        tie_embeddings=c.get("tie_embeddings", True))
    src = None
    for name in ("pytorch_model.bin", "model.safetensors"):
        if os.path.isfile(os.path.join(path, name)):
            src = os.path.join(path, name)
            break
    if src is None:
        raise MQUserError(f"{path}: mamba-ssm directory without pytorch_model.bin")
    sd = read_torch_pickle(src) if src.endswith(".bin") else read_safetensors(src)
    if not isinstance(sd, dict):
        raise MQUserError(f"{src}: expected a state dict")
    sd = _rename(sd, [(r"^backbone\.", "")])
    return _load_into(build_model(cfg), sd, src), cfg, {"vocab_size_unpadded": c["vocab_size"]}


def _vim_config_from_state_dict(sd: dict, overrides: dict, src: str) -> VimConfig:
    try:
        pw = sd["patch_embed.proj.weight"]
        d_model, in_chans, patch, _ = pw.shape
        n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        di, n = sd["layers.0.mixer.A_log"].shape
        dt_rank = sd["layers.0.mixer.dt_proj.weight"].shape[1]
        d_conv = sd["layers.0.mixer.conv1d.weight"].shape[-1]
        num_classes = sd["head.weight"].shape[0]
        num_tokens = sd["pos_embed"].shape[1]
    except (KeyError, ValueError) as e:
        raise MQUserError(f"{src}: not a Vision Mamba state dict (missing {e})") from None
    if "cls_token" not in sd:
        raise MQUserError(f"{src}: Vim without a class token is not supported")
    if any(k.startswith(("cls_token_head", "cls_token_tail")) or k.endswith(".gamma") for k in sd):
        raise MQUserError(f"{src}: double class tokens / layer scale are not supported")
    if "layers.0.mixer.A_b_log" not in sd or "layers.0.mixer.conv1d_b.weight" not in sd:
        raise MQUserError(f"{src}: only bimamba v2 Vim checkpoints are supported")
    if "layers.0.norm.bias" in sd:
        raise MQUserError(f"{src}: LayerNorm Vim (rms_norm false) is not supported")
    stride = overrides.get("stride", patch)
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise MQUserError(f"{src}: pos_embed has {num_tokens} tokens, not a square grid plus one class token")
    img_size = overrides.get("img_size", (grid - 1) * stride + patch)
    mixer = MixerConfig(d_model=d_model, d_state=n, d_conv=d_conv, d_inner=di, expand=max(1, di // d_model),
                        dt_rank=dt_rank, conv_bias="layers.0.mixer.conv1d.bias" in sd,
                        bias="layers.0.mixer.in_proj.bias" in sd, bimamba=True)
    kw = {k: overrides[k] for k in ("image_mean", "image_std", "norm_eps", "residual_in_fp32") if k in overrides}
    cfg = VimConfig(d_model=d_model, n_layer=n_layer, num_classes=num_classes, img_size=img_size,
                    patch_size=patch, stride=stride, in_chans=in_chans, mixer=mixer, **kw)
    if cfg.num_patches + 1 != num_tokens:
        raise MQUserError(f"{src}: pos_embed has {num_tokens} tokens, img_size {img_size} with patch {patch} "
                          f"and stride {stride} gives {cfg.num_patches + 1}")
    return cfg


def _load_vim(path):
    overrides = {}
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            c = _read_json(cfg_path)
            overrides = {"img_size": c.get("img_size"), "stride": c.get("stride"),
                         "image_mean": c.get("image_mean"), "image_std": c.get("image_std"),
                         "norm_eps": c.get("norm_epsilon")}
            overrides = {k: v for k, v in overrides.items() if v is not None}
        src = _find_pth(path)
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
    sd = _rename(dict(sd), [(r"^module\.", "")])
    cfg = _vim_config_from_state_dict(sd, overrides, src)
    return _load_into(build_model(cfg), sd, src), cfg, {}


_LOADERS = {"mq-deploy": _load_ours, "hf-mamba": _load_hf, "mamba-ssm": _load_mamba_ssm, "vim": _load_vim}


def load_model(path: str) -> LoadedModel:
    """Load any supported checkpoint into our PyTorch model (fp32, eval mode)."""
    fmt = detect_format(path)
    try:
        model, cfg, extra = _LOADERS[fmt](path)
    except KeyError as e:
        raise MQUserError(f"{path}: {fmt} config is missing the field {e}") from None
    model.eval()
    return LoadedModel(model=model, format=fmt, path=path, config=cfg, extra=extra)
