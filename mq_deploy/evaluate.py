"""`mq-deploy eval`: the end metric of a model on its data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mq_deploy.errors import MQUserError, note


@dataclass
class EvalConfig:
    data: str | None = None        # text file (LM), idx directory or image folder (Vim); default: the sample's own
    limit: int | None = None       # at most this many windows (LM) or images (Vim)
    split: str = "test"            # Vim: idx split
    seq_len: int = 1024            # LM: window length in tokens
    batch: int | None = None
    tokenizer: str | None = None   # LM: tokenizer.json or its folder (default: the checkpoint's; bytes for vocab 256)
    progress: bool | None = None   # None: a progress bar only on a terminal

    def __post_init__(self):
        if self.limit is not None and self.limit <= 0:
            raise MQUserError(f"--limit must be positive, got {self.limit}")
        if self.seq_len <= 0:
            raise MQUserError(f"--seq-len must be positive, got {self.seq_len}")
        if self.batch is not None and self.batch <= 0:
            raise MQUserError(f"--batch must be positive, got {self.batch}")


def _default_data(loaded, key="eval_data"):
    path = loaded.data_path(key)
    if path is None:
        raise MQUserError(f"{loaded.path}: no default evaluation data; pass --data "
                          "(a text file for a language model, an idx directory for Vim)")
    return path


def lm_windows(path: str, seq_len: int, limit: int | None, codec=None):
    """Non-overlapping windows [n, seq_len + 1] of token ids (bytes when no codec is given)."""
    return lm_token_windows(path, seq_len, limit, codec)[0]


def lm_token_windows(path: str, seq_len: int, limit: int | None, codec=None):
    """(windows [n, seq_len + 1] of token ids, bytes [n, seq_len + 1] each token covers).

    seq_len counts tokens. Window k holds tokens k*seq_len .. k*seq_len + seq_len; all but its first
    are predicted, so the windows together predict every token but the very first once."""
    from mq_deploy.data.text import windows
    from mq_deploy.data.tokenizer import ByteCodec, encode_file

    codec = codec or ByteCodec()
    ids, nbytes = encode_file(codec, path)
    if len(ids) < seq_len + 1:
        raise MQUserError(f"{path}: {len(ids)} tokens, shorter than one window of {seq_len + 1} (lower --seq-len)")
    w, b = windows(ids, seq_len), windows(nbytes, seq_len)
    return (w[:limit], b[:limit]) if limit else (w, b)


def lm_metrics(forward, w: np.ndarray, nbytes: np.ndarray, batch: int = 8, progress=None) -> dict:
    """Bits per byte (NLL in bits of the predicted tokens / UTF-8 bytes they cover) and perplexity per token."""
    import math

    import torch

    from mq_deploy.verify.metrics import _progress, nats

    t = torch.from_numpy(np.ascontiguousarray(w).astype(np.int64))
    total = 0.0
    with _progress(len(t), "bits/byte", progress) as bar, torch.no_grad():
        for i in range(0, len(t), batch):
            xb = t[i:i + batch]
            logits = torch.as_tensor(forward(xb[:, :-1])).double()
            total += nats(logits, xb[:, 1:])
            bar.update(len(xb))
    tokens = int(w.shape[0] * (w.shape[1] - 1))
    covered = int(nbytes[:, 1:].sum())
    return {"bits_per_byte": total / math.log(2) / max(covered, 1), "perplexity": math.exp(total / tokens),
            "tokens": tokens, "bytes": covered, "nats": total}


def vim_data(loaded, path: str, split: str, limit: int | None, scoring: bool = True):
    """(images, labels) for a Vim: an idx directory (Fashion-MNIST) or an image folder (ImageFolder layout
    or flat; labels None for a flat one). Folder images are read batch by batch as they are sliced.
    scoring: the labels will be scored (a folder with fewer classes than the model gets a note)."""
    from mq_deploy.data.images import (
        ImageFolderData,
        is_image_folder,
        list_image_folder,
        load_idx_split,
        spread,
        to_tensor,
    )

    cfg = loaded.config
    if is_image_folder(path):
        files, labels, classes = list_image_folder(path)
        keep = spread(len(files), limit)
        files = [files[i] for i in keep]
        if labels is not None:
            labels = labels[keep]
            if len(classes) > cfg.num_classes:
                raise MQUserError(f"{path}: {len(classes)} class folders, the model has {cfg.num_classes} classes")
            if scoring and len(classes) < cfg.num_classes:
                note(f"{path}: {len(classes)} class folders for a model of {cfg.num_classes} classes; labels are "
                     f"the folders' sorted positions 0..{len(classes) - 1} (as torchvision's ImageFolder), so "
                     "top-1 is right only if they are the model's first classes in that order")
        return ImageFolderData(files, cfg.in_chans, cfg.img_size, cfg.image_mean, cfg.image_std), labels
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
    """Return {"metric", "value", "samples", "data"}; `forward` defaults to the PyTorch model.
    A non-finite result (weights that overflow to NaN/inf logits) is an error, never a printed nan."""
    import math

    res = _evaluate(loaded, cfg, forward)
    if not math.isfinite(res["value"]):
        raise MQUserError(f"{loaded.path}: the model's outputs are not finite on {res['data']} ({res['metric']} = "
                          f"{res['value']}); its weights overflow float32 (check the checkpoint)")
    return res


def _evaluate(loaded, cfg: EvalConfig, forward=None) -> dict:
    from mq_deploy.verify import metrics

    model = loaded.model
    forward = forward or model
    data = cfg.data or _default_data(loaded)
    if loaded.architecture == "mamba_lm":
        from mq_deploy.data.tokenizer import tokenizer_for

        codec = tokenizer_for(loaded, cfg.tokenizer)
        w, nbytes = lm_token_windows(data, cfg.seq_len, cfg.limit, codec)
        m = lm_metrics(forward, w, nbytes, batch=cfg.batch or 8, progress=cfg.progress)
        return {"metric": "bits_per_byte", "value": m["bits_per_byte"], "samples": m["tokens"], "data": data,
                "perplexity": m["perplexity"], "bytes": m["bytes"], "tokenizer": codec.source}
    images, labels = vim_data(loaded, data, cfg.split, cfg.limit)
    if labels is None:
        raise MQUserError(f"{data}: a flat folder has no labels; top-1 needs the ImageFolder layout "
                          "(one subfolder per class)")
    value = metrics.top1(forward, images, np.asarray(labels), batch=cfg.batch or 256, progress=cfg.progress)
    return {"metric": "top1", "value": value, "samples": int(len(labels)), "data": data}
