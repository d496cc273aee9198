"""Calibration data for a loaded model, and the recipe x bit-width comparison table."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from mq_deploy.errors import MQUserError
from mq_deploy.quant.fakequant import QuantConfig
from mq_deploy.quant.recipes import RECIPES, RecipeConfig, apply_recipe

BITS = {"w8a8": (8, 8), "w4a8": (4, 8)}


@dataclass
class CalibConfig:
    path: str | None = None           # text file (LM) / idx directory (Vim); default: the sample's calib data
    samples: int | None = None        # LM: windows of seq_len bytes (default 32); Vim: images (default 256)
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.samples is not None and self.samples <= 0:
            raise MQUserError(f"--calib-samples must be positive, got {self.samples}")


def calibration_loop(loaded, cfg: CalibConfig):
    """A forward loop over the calibration data of `loaded` (a LoadedModel)."""
    from mq_deploy.calib.collect import image_forward_loop, text_forward_loop

    path = cfg.path
    if path is None:
        rel = (loaded.extra or {}).get("calib_data")
        if rel is None:
            raise MQUserError(f"{loaded.path}: no default calibration data; pass --calib")
        path = os.path.join(loaded.path, rel)
    if loaded.architecture == "mamba_lm":
        from mq_deploy.data.text import read_bytes

        loop = text_forward_loop(read_bytes(path), cfg.seq_len, cfg.samples or 32)
    else:
        import torch

        from mq_deploy.evaluate import vim_data

        split = "calib" if os.path.exists(os.path.join(path, "calib-images-idx3-ubyte.gz")) else "train"
        images, _ = vim_data(loaded, path, split, None)
        g = torch.Generator().manual_seed(cfg.seed)
        images = images[torch.randperm(len(images), generator=g)]
        loop = image_forward_loop(images, cfg.samples or 256)
    loop.source = path
    return loop


def parse_list(text: str, allowed, what: str):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise MQUserError(f"unknown {what} {bad or text!r} (choose from {', '.join(allowed)})")
    return items


def compare(model_path: str, recipes, bits, calib: CalibConfig, eval_cfg, progress=None, alpha: float = 0.5,
            percentile: float = 99.99) -> dict:
    """Evaluate every recipe at every bit width on a fresh copy of the model. Returns {"rows": [...]}."""
    from mq_deploy.evaluate import evaluate
    from mq_deploy.models.loaders import load_model

    rows, fp_value = [], None
    todo = [("fp", "fp")] + [(r, b) for r in recipes if r != "fp" for b in bits]
    for recipe, b in todo:
        loaded = load_model(model_path)
        t0 = time.time()
        if recipe != "fp":
            wb, ab = BITS[b]
            rcfg = RecipeConfig(recipe, QuantConfig(wb, ab), alpha=alpha, percentile=percentile)
            apply_recipe(loaded.model, calibration_loop(loaded, calib), rcfg)
        res = evaluate(loaded, eval_cfg)
        if recipe == "fp":
            fp_value = res["value"]
        delta = res["value"] - fp_value
        row = {"recipe": recipe, "bits": b, "metric": res["metric"], "value": res["value"], "delta": delta,
               "samples": res["samples"], "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        if progress:
            progress(row)
    return {"model": model_path, "rows": rows}


__all__ = ["BITS", "CalibConfig", "RECIPES", "calibration_loop", "compare", "parse_list"]
