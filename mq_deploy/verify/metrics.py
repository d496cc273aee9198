"""End metrics: bits per byte for byte-level LMs, top-1 for image classifiers.

Each takes a `forward` callable (batch in, logits out) so the same code scores the PyTorch model,
a fake-quantized model or an ONNX Runtime session.
"""

from __future__ import annotations

import math

import numpy as np


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI
    return tqdm(total=total, desc=desc, unit="sample", disable=None if enabled is None else not enabled,
                leave=False, dynamic_ncols=True)


def nats(logits, targets) -> float:
    """Summed cross-entropy (natural log) of next-token logits [..., V] against targets [...]."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


def bits_per_byte(forward, windows: np.ndarray, batch: int = 8, progress: bool | None = None) -> float:
    """windows [n, L+1] of byte ids: score tokens 1..L of each window given the ones before it."""
    import torch

    w = torch.from_numpy(np.ascontiguousarray(windows).astype(np.int64))
    total = 0.0
    with _progress(len(w), "bits/byte", progress) as bar, torch.no_grad():
        for i in range(0, len(w), batch):
            xb = w[i:i + batch]
            logits = torch.as_tensor(forward(xb[:, :-1])).float()
            total += nats(logits, xb[:, 1:])
            bar.update(len(xb))
    return total / (w.shape[0] * (w.shape[1] - 1)) / math.log(2)


def top1(forward, images, labels: np.ndarray, batch: int = 256, progress: bool | None = None) -> float:
    """images: normalised float tensor [n, C, H, W]; labels int [n]."""
    import torch

    correct = 0
    with _progress(len(labels), "top-1", progress) as bar, torch.no_grad():
        for i in range(0, len(labels), batch):
            pred = torch.as_tensor(forward(images[i:i + batch])).argmax(-1).numpy()
            correct += int((pred == labels[i:i + batch]).sum())
            bar.update(len(pred))
    return correct / len(labels)
