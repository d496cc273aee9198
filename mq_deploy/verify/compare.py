"""Error statistics between two outputs (numpy only: backends use it to check their own builds)."""

from __future__ import annotations

import numpy as np

from mq_deploy.errors import MQUserError


def compare_outputs(got: np.ndarray, ref: np.ndarray, classes: bool = True) -> dict:
    """Error statistics of one output (rows = all leading dims, the last dim is the feature/class axis)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise MQUserError(f"output shapes differ: artifact {list(got.shape)} vs reference {list(ref.shape)}")
    diff = np.abs(got - ref)
    floor = max(1e-30, 1e-6 * float(np.abs(ref).max(initial=0.0)))
    rel = diff / np.maximum(np.abs(ref), floor)
    g2, r2 = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    ng, nr = np.linalg.norm(g2, axis=-1), np.linalg.norm(r2, axis=-1)
    cos = (g2 * r2).sum(-1) / np.maximum(ng * nr, 1e-30)
    cos[(ng == 0) & (nr == 0)] = 1.0          # two all-zero rows (e.g. a fresh conv state) agree
    out = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "median_abs": float(np.median(diff)),
           "max_rel": float(rel.max()), "mean_rel": float(rel.mean()), "median_rel": float(np.median(rel)),
           "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "elements": int(diff.size)}
    if classes:   # the last axis is a class / vocabulary axis
        out["top1_agreement"] = float((g2.argmax(-1) == r2.argmax(-1)).mean())
    return out
