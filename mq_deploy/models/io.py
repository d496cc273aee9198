"""Our own checkpoint directory format: config.json (with "architecture") + model.safetensors.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place, so
an interrupted save never leaves a half-written model, and an existing directory is only replaced
when asked.
"""

from __future__ import annotations

import json
import os

from mq_deploy import __version__

FORMAT_KEY = "mq_deploy_format"
FORMAT_VERSION = 1


def _model_class(cfg):
    from mq_deploy.config import MambaLMConfig, VimConfig

    if isinstance(cfg, MambaLMConfig):
        from mq_deploy.models.mamba import MambaLM
        return MambaLM
    if isinstance(cfg, VimConfig):
        from mq_deploy.models.vim import Vim
        return Vim
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def build_model(cfg):
    """The model of `cfg` (call it on the meta device for shapes only: check_memory before allocating it)."""
    return _model_class(cfg)(cfg)


def check_memory(model) -> None:
    """Before a model built on the meta device is allocated in float32: it fits in this machine's memory (a
    config we read back may describe a model of any size: one clear line, not an allocation that kills us).
    A layer-streamed stage never allocates the whole model and does not call this."""
    need, have = 4 * sum(p.numel() for p in model.parameters()), _memory_bytes()
    if have and need > have:
        from mq_deploy.errors import MQUserError

        raise MQUserError(f"the model this config describes needs {need / 2**30:.1f} GiB of float32 weights, more "
                          f"than this machine's {have / 2**30:.1f} GiB of memory; the layer-streamed stages read it "
                          "one layer at a time (--stream on)")


def model_state_dict(model) -> dict:
    """State dict without the tied lm_head alias, all tensors contiguous (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def atomic_write_dir(out_dir: str, write_fn, overwrite: bool = False, inputs=(), kind: str = "") -> str:
    """Call write_fn(tmp_dir), then swap tmp_dir into out_dir (mq_deploy.fileio.atomic_dir: never over
    an input, --overwrite only over a folder mq-deploy wrote)."""
    from mq_deploy import fileio

    with fileio.atomic_dir(out_dir, overwrite=overwrite, inputs=inputs, kind=kind) as tmp:
        write_fn(tmp)
    return os.path.abspath(out_dir)


def _config_dict(model, extra: dict | None) -> dict:
    cfg = model.cfg.to_dict()
    cfg[FORMAT_KEY] = FORMAT_VERSION
    cfg["mq_deploy_version"] = __version__
    if extra:
        cfg["extra"] = extra
    return cfg


def _write_model_files(model, directory: str, extra: dict | None, inout: bool = False) -> None:
    """model.safetensors and config.json, each written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    from mq_deploy import fileio

    with fileio.atomic_path(os.path.join(directory, "model.safetensors"), overwrite=inout, inout=inout) as tmp:
        save_file(model_state_dict(model), tmp, metadata={"format": "pt"})
    fileio.write_text(os.path.join(directory, "config.json"),
                      json.dumps(_config_dict(model, extra), indent=2, sort_keys=True) + "\n",
                      overwrite=inout, inout=inout)


def save_model(model, out_dir: str, extra: dict | None = None, overwrite: bool = False, inputs=()) -> str:
    """Write model to a new directory out_dir in our format (atomically); `extra` lands in config.json."""
    return atomic_write_dir(out_dir, lambda tmp: _write_model_files(model, tmp, extra), overwrite=overwrite,
                            inputs=inputs, kind="model")


def save_weights_into(model, directory: str, extra: dict | None = None) -> None:
    """Replace directory/model.safetensors and config.json in place, file by file atomically
    (training checkpoints into its output folder, which also holds data and logs)."""
    os.makedirs(directory, exist_ok=True)
    _write_model_files(model, directory, extra, inout=True)
