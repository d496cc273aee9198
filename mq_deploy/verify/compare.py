"""Error statistics between two outputs (numpy only: backends use it to check their own builds)."""

from __future__ import annotations

import numpy as np

from mq_deploy.errors import MQUserError

_CHUNK_BYTES = 16 << 20      # float64 bytes per block of rows of the per-row statistics
_F32_MAX = float(np.finfo(np.float32).max)


def compare_outputs(got: np.ndarray, ref: np.ndarray, classes: bool = True) -> dict:
    """Error statistics of one output (rows = all leading dims, the last dim is the feature/class axis).
    Computed a block of rows at a time in float64; only the elementwise errors the medians need are held
    whole, in float32 (as a verify over 50k-vocabulary logits would otherwise hold several float64 copies of them;
    at 256000 tokens two windows of 512 are 2 GiB per float64 copy)."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        raise MQUserError(f"output shapes differ: artifact {list(got.shape)} vs reference {list(ref.shape)}")
    width = got.shape[-1] if got.ndim else 1
    g2, r2 = got.reshape(-1, width), ref.reshape(-1, width)
    floor = max(1e-30, 1e-6 * float(np.abs(r2).max(initial=0.0)))
    # held whole for the medians: float32 (each value computed in float64, then rounded once); at a 256000-token
    # vocabulary two windows of logits are 2 GiB per float64 copy
    diff = np.empty(g2.shape, np.float32)
    rel = np.empty(g2.shape, np.float32)
    cos = np.empty(g2.shape[0], np.float64)
    agree, rows = 0, max(1, _CHUNK_BYTES // (8 * max(1, width)))
    for i in range(0, g2.shape[0], rows):
        g, r = g2[i:i + rows].astype(np.float64), r2[i:i + rows].astype(np.float64)
        d = np.abs(g - r)
        np.minimum(d, _F32_MAX, out=diff[i:i + rows], casting="same_kind")      # (past float32: its largest value)
        np.minimum(d / np.maximum(np.abs(r), floor), _F32_MAX, out=rel[i:i + rows], casting="same_kind")
        ng, nr = np.linalg.norm(g, axis=-1), np.linalg.norm(r, axis=-1)
        c = (g * r).sum(-1) / np.maximum(ng * nr, 1e-30)
        c[(ng == 0) & (nr == 0)] = 1.0          # two all-zero rows (e.g. a fresh conv state) agree
        cos[i:i + rows] = c
        if classes:
            agree += int((g.argmax(-1) == r.argmax(-1)).sum())
    n = diff.size
    out = {"max_abs": float(diff.max(initial=0.0)), "mean_abs": float(diff.sum(dtype=np.float64) / n) if n else 0.0,
           "max_rel": float(rel.max(initial=0.0)), "mean_rel": float(rel.sum(dtype=np.float64) / n) if n else 0.0,
           "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "elements": int(n)}
    out["median_abs"] = float(np.median(diff.reshape(-1), overwrite_input=True))      # (diff is ours to reorder)
    out["median_rel"] = float(np.median(rel.reshape(-1), overwrite_input=True))
    if classes:   # the last axis is a class / vocabulary axis
        out["top1_agreement"] = agree / max(1, g2.shape[0])
    return {k: out[k] for k in ("max_abs", "mean_abs", "median_abs", "max_rel", "mean_rel", "median_rel",
                                "cosine_mean", "cosine_min", "elements", "top1_agreement") if k in out}
