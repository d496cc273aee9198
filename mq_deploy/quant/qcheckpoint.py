"""Quantized checkpoint directory: what `mq-deploy quantize` writes and `eval` / `export` read.

    config.json      our model config + "quant" (recipe, bits, which runtime transforms exist)
    model.safetensors  transformed weights, already rounded to the integer grid (dequantized fp32),
                     plus the runtime buffers (online rotation before out_proj, gate smoothing)
    scales.safetensors "act/<point>" per-tensor activation scales, "weight/<param>" per-channel scales
    manifest.json    recipe, bits, calibration source and size, seed, tool versions, time
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from mq_deploy import __version__
from mq_deploy.errors import MQUserError
from mq_deploy.models.io import FORMAT_KEY, atomic_write_dir, model_state_dict
from mq_deploy.quant.fakequant import QuantConfig, attach_activation_quant


def save_quantized(model, out_dir: str, recipe_cfg, scales: dict, calib_info: dict, source_extra: dict,
                   source_path: str, overwrite: bool = False) -> str:
    mixer0 = model.layers[0].mixer
    quant = {"recipe": recipe_cfg.recipe, "wbits": recipe_cfg.quant.wbits, "abits": recipe_cfg.quant.abits,
             "act_granularity": recipe_cfg.quant.act_granularity,
             "online_out_rotation": mixer0.out_rotation is not None, "gate_scale": mixer0.gate_scale is not None}
    cfg = model.cfg.to_dict()
    cfg.update({FORMAT_KEY: 1, "mq_deploy_version": __version__, "quant": quant})
    out_abs = os.path.abspath(out_dir)
    src_dir = source_path if os.path.isdir(source_path) else os.path.dirname(source_path)
    # keep the sample's default eval/calibration data reachable from the new directory
    cfg["extra"] = {k: os.path.relpath(os.path.join(os.path.abspath(src_dir), v), out_abs)
                    for k, v in (source_extra or {}).items() if k in ("eval_data", "calib_data")}
    flat = {f"act/{k}": v.reshape(1).float() for k, v in scales["act_scales"].items()}
    flat.update({f"weight/{k}": v.float() for k, v in scales["weight_scales"].items()})
    manifest = {"recipe": recipe_cfg.recipe, "wbits": recipe_cfg.quant.wbits, "abits": recipe_cfg.quant.abits,
                "act_granularity": recipe_cfg.quant.act_granularity, "alpha": recipe_cfg.alpha,
                "percentile": recipe_cfg.percentile, "source_model": os.path.abspath(source_path),
                "calibration": calib_info, "versions": {"mq_deploy": __version__, "torch": torch.__version__,
                                                        "python": platform.python_version()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def write(tmp):
        from safetensors.torch import save_file

        save_file(model_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        save_file(flat, os.path.join(tmp, "scales.safetensors"))
        for name, obj in (("config.json", cfg), ("manifest.json", manifest)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
                f.write("\n")

    return atomic_write_dir(out_dir, write, overwrite=overwrite)


def load(path: str):
    """load_model, plus activation fake-quant when `path` is a quantized checkpoint."""
    from mq_deploy.models.loaders import load_model, read_safetensors

    loaded = load_model(path)
    quant = (loaded.extra or {}).get("quant")
    if quant is None:
        return loaded
    qcfg = QuantConfig(quant["wbits"], quant["abits"], quant["act_granularity"])
    scales_path = os.path.join(path, "scales.safetensors")
    flat = read_safetensors(scales_path)
    act = {k[len("act/"):]: v.reshape(()) for k, v in flat.items() if k.startswith("act/")}
    if qcfg.act_granularity == "per_tensor" and not act:
        raise MQUserError(f"{scales_path}: no activation scales")
    attach_activation_quant(loaded.model, act, qcfg)
    return loaded
