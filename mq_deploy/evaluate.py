"""`mq-deploy eval`: the end metric of a model on its data."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mq_deploy.errors import MQUserError


@dataclass
class EvalConfig:
    data: str | None = None        # text file (LM) or idx directory (Vim); default: the sample's own data
    limit: int | None = None       # at most this many windows (LM) or images (Vim)
    split: str = "test"            # Vim: idx split
    seq_len: int = 1024            # LM: window length
    batch: int | None = None
    progress: bool | None = None   # None: a progress bar only on a terminal

    def __post_init__(self):
        if self.limit is not None and self.limit <= 0:
            raise MQUserError(f"--limit must be positive, got {self.limit}")
        if self.seq_len <= 0:
            raise MQUserError(f"--seq-len must be positive, got {self.seq_len}")
        if self.batch is not None and self.batch <= 0:
            raise MQUserError(f"--batch must be positive, got {self.batch}")


def _default_data(loaded, key="eval_data"):
    rel = (loaded.extra or {}).get(key)
    if rel is None or not os.path.isdir(loaded.path):
        raise MQUserError(f"{loaded.path}: no default evaluation data; pass --data "
                          "(a text file for a language model, an idx directory for Vim)")
    return os.path.normpath(os.path.join(loaded.path, rel))


def lm_windows(path: str, seq_len: int, limit: int | None):
    from mq_deploy.data.text import read_bytes, windows

    w = windows(read_bytes(path), seq_len)
    return w[:limit] if limit else w


def vim_data(loaded, path: str, split: str, limit: int | None):
    from mq_deploy.data.images import load_idx_split, to_tensor

    cfg = loaded.config
    images, labels = load_idx_split(path, split)
    if limit:
        images, labels = images[:limit], labels[:limit]
    if images.shape[1:] != (cfg.img_size, cfg.img_size) or cfg.in_chans != 1:
        raise MQUserError(f"{path}: images are {images.shape[1:]} grey-scale, the model takes "
                          f"{cfg.in_chans}x{cfg.img_size}x{cfg.img_size}")
    if labels.max() >= cfg.num_classes:
        raise MQUserError(f"{path}: label {labels.max()} out of range for {cfg.num_classes} classes")
    return to_tensor(images, cfg.image_mean, cfg.image_std), labels


def evaluate(loaded, cfg: EvalConfig, forward=None) -> dict:
    """Return {"metric", "value", "samples", "data"}; `forward` defaults to the PyTorch model."""
    from mq_deploy.verify import metrics

    model = loaded.model
    forward = forward or model
    data = cfg.data or _default_data(loaded)
    if loaded.architecture == "mamba_lm":
        if loaded.config.vocab_size != 256:
            raise MQUserError(f"{loaded.path}: bits per byte needs a byte-level LM (vocab 256); this model's "
                              f"vocabulary has {loaded.config.vocab_size} entries and no tokenizer is bundled")
        w = lm_windows(data, cfg.seq_len, cfg.limit)
        value = metrics.bits_per_byte(forward, w, batch=cfg.batch or 8, progress=cfg.progress)
        return {"metric": "bits_per_byte", "value": value, "samples": int(w.shape[0] * (w.shape[1] - 1)),
                "data": data}
    images, labels = vim_data(loaded, data, cfg.split, cfg.limit)
    value = metrics.top1(forward, images, np.asarray(labels), batch=cfg.batch or 256, progress=cfg.progress)
    return {"metric": "top1", "value": value, "samples": int(len(labels)), "data": data}
