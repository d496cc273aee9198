"""Text data for byte-level LMs: UTF-8 bytes are the tokens (vocab 256)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np

from mq_deploy.errors import MQUserError


def read_bytes(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise MQUserError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 2:
        raise MQUserError(f"{path}: too short to evaluate a language model on ({len(data)} bytes)")
    return np.frombuffer(data, dtype=np.uint8)


def kjv_text() -> bytes:
    """The King James Bible as printed by the `bible` program of Debian's bible-kjv."""
    exe = shutil.which("bible")
    if exe is None:
        raise MQUserError("the `bible` program is missing: apt-get install bible-kjv bible-kjv-text")
    out = subprocess.run([exe, "Genesis1:1-Revelation22:21"], check=True, capture_output=True).stdout
    if len(out) < 1_000_000:
        raise MQUserError(f"`bible` printed only {len(out)} bytes; is bible-kjv-text installed?")
    return out


def split_train_heldout(data: bytes, heldout_fraction: float = 0.05):
    """Contiguous split at a line boundary: the last `heldout_fraction` of the text is held out."""
    cut = data.rfind(b"\n", 0, int(len(data) * (1 - heldout_fraction))) + 1
    return data[:cut], data[cut:]


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets); the tail is dropped."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise MQUserError(f"text of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx]


def bigram_bits_per_byte(train: bytes, heldout: bytes, alpha: float = 0.1) -> float:
    """Add-alpha smoothed byte bigram fitted on train, scored on heldout (the baseline a model must beat)."""
    tr = np.frombuffer(train, dtype=np.uint8).astype(np.int64)
    counts = np.bincount(tr[:-1] * 256 + tr[1:], minlength=256 * 256).reshape(256, 256).astype(np.float64) + alpha
    logp = np.log2(counts / counts.sum(1, keepdims=True))
    ho = np.frombuffer(heldout, dtype=np.uint8).astype(np.int64)
    return float(-logp[ho[:-1], ho[1:]].mean())
