"""Our own checkpoint directory format: config.json (with "architecture") + model.safetensors.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place, so
an interrupted save never leaves a half-written model, and an existing directory is only replaced
when asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from mq_deploy import __version__
from mq_deploy.errors import MQUserError

FORMAT_KEY = "mq_deploy_format"
FORMAT_VERSION = 1


def build_model(cfg):
    from mq_deploy.config import MambaLMConfig, VimConfig

    if isinstance(cfg, MambaLMConfig):
        from mq_deploy.models.mamba import MambaLM
        return MambaLM(cfg)
    if isinstance(cfg, VimConfig):
        from mq_deploy.models.vim import Vim
        return Vim(cfg)
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def model_state_dict(model) -> dict:
    """State dict without the tied lm_head alias, all tensors contiguous (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def atomic_write_dir(out_dir: str, write_fn, overwrite: bool = False) -> str:
    """Call write_fn(tmp_dir), then move tmp_dir to out_dir in one rename."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise MQUserError(f"{out_dir}: already exists (pass overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".", dir=parent)
    try:
        write_fn(tmp)
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_model(model, out_dir: str, extra: dict | None = None, overwrite: bool = False) -> str:
    """Write model to out_dir in our format; `extra` lands in config.json under "extra"."""
    from safetensors.torch import save_file

    cfg = model.cfg.to_dict()
    cfg[FORMAT_KEY] = FORMAT_VERSION
    cfg["mq_deploy_version"] = __version__
    if extra:
        cfg["extra"] = extra

    def write(tmp):
        save_file(model_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write_dir(out_dir, write, overwrite=overwrite)


def save_weights_into(model, directory: str, extra: dict | None = None) -> None:
    """Atomically replace directory/model.safetensors and config.json (used by training to checkpoint in place)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".model.safetensors.tmp")
    save_file(model_state_dict(model), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    cfg = model.cfg.to_dict()
    cfg[FORMAT_KEY] = FORMAT_VERSION
    cfg["mq_deploy_version"] = __version__
    if extra:
        cfg["extra"] = extra
    tmp = os.path.join(directory, ".config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, "config.json"))
