"""Calibration data for a loaded model, and the recipe x bit-width comparison table with bootstrap intervals.

Every row is scored per sample (bits per byte of each LM window, correct / wrong of each image), so the
table carries bootstrap 95 % intervals. The resamples are *paired*: the same resampled windows or images
score every row, so the interval of a delta (vs FP, or MambaQuant vs QuaRot) reflects how the methods
differ on the same data, not the much larger spread of the data itself.

Each recipe's transforms and its calibration pass run once; every bit width then rounds a copy of the
transformed model (observers such as mse and entropy pick their threshold per activation bit width).

`calibration_split` holds out the part of the calibration data that calibration does not use (LM:
the windows after the calibration ones; Vim: the shuffled images after the first `samples`): defaults
are chosen there, never on the evaluation set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from mq_deploy.errors import MQUserError, note
from mq_deploy.quant.recipes import RECIPES, RecipeConfig, recipe_names

# fake-quant settings; A6 / A4 are evaluation only (export and the int8 scan take A8)
BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w8a6": (8, 6), "w4a6": (4, 6), "w8a4": (8, 4)}
EXPORTABLE_ABITS = (8,)


@dataclass
class CalibConfig:
    path: str | None = None           # text file (LM) / idx directory (Vim); default: the sample's calib data
    samples: int | None = None        # LM: windows of seq_len tokens (default 32); Vim: images (default 256)
    seq_len: int = 512                # LM: calibration window in tokens
    seed: int = 0
    tokenizer: str | None = None      # LM: tokenizer.json or its folder (default: the checkpoint's;
                                      # bytes for vocab 256)

    def __post_init__(self):
        if self.samples is not None and self.samples <= 0:
            raise MQUserError(f"--calib-samples must be positive, got {self.samples}")
        if self.seq_len <= 0:
            raise MQUserError(f"the calibration window (--seq-len) must be positive, got {self.seq_len}")


def _calib_path(loaded, cfg: CalibConfig) -> str:
    if cfg.path is not None:
        return cfg.path
    path = loaded.data_path("calib_data")
    if path is None:
        raise MQUserError(f"{loaded.path}: no default calibration data; pass --calib")
    return path


def _calib_images(loaded, path: str, seed: int):
    import torch

    from mq_deploy.evaluate import vim_data

    split = "calib" if os.path.exists(os.path.join(path, "calib-images-idx3-ubyte.gz")) else "train"
    images, labels = vim_data(loaded, path, split, None, scoring=False)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[perm], (None if labels is None else labels[perm.numpy()])


# Calibration activations per forward: at most 8 windows x 512 tokens x d_inner 1536 (mamba-130m) values
# per [batch, L, d_inner] tensor (25 MB), so wider models take fewer windows per batch (2.8b: 2) and the
# activations stay ~constant next to the weights.
CALIB_BATCH_VALUES = 8 * 512 * 1536


def calibration_batch(model, seq_len: int) -> int:
    width = max(m.out_features for m in model.cfg.layer_configs())      # the widest block activation
    return max(1, min(8, CALIB_BATCH_VALUES // max(1, seq_len * width)))


def calibration_loop(loaded, cfg: CalibConfig):
    """A forward loop over the calibration data of `loaded` (a LoadedModel)."""
    return calibration_split(loaded, cfg)[0]


def calibration_split(loaded, cfg: CalibConfig, heldout_seq_len: int = 1024):
    """(calibration loop, held-out data): the held-out part is the calibration file's data that the
    loop does not use, as score_samples takes it: ("lm", token windows, bytes the predicted tokens of
    each window cover) or ("vim", images, labels) (None when nothing is left)."""
    from mq_deploy.calib.collect import image_forward_loop, text_forward_loop

    path = _calib_path(loaded, cfg)
    if loaded.architecture == "mamba_lm":
        from mq_deploy.data.text import windows
        from mq_deploy.data.tokenizer import encode_file, tokenizer_for

        codec = tokenizer_for(loaded, cfg.tokenizer)
        tokens, nbytes = encode_file(codec, path)   # never bytes as token ids
        have = (len(tokens) - 1) // cfg.seq_len
        if have < 1:
            raise MQUserError(f"{path}: {len(tokens)} tokens, shorter than one calibration window of "
                              f"{cfg.seq_len + 1} (lower --seq-len, or give more text)")
        n = cfg.samples or 32
        if n > have:
            if cfg.samples:      # asked for (the default 32 quietly takes what there is; the manifest says how many)
                note(f"{path} holds {have} windows of {cfg.seq_len} tokens: calibrating on {have}, not {n}")
            n = have
        loop = text_forward_loop(tokens, cfg.seq_len, n, batch=calibration_batch(loaded.model, cfg.seq_len))
        loop.codec = codec        # what the text was tokenized with (quantize keeps a copy of it)
        rest, rest_bytes = tokens[n * cfg.seq_len + 1:], nbytes[n * cfg.seq_len + 1:]
        held = (("lm", windows(rest, heldout_seq_len), windows(rest_bytes, heldout_seq_len)[:, 1:].sum(1))
                if len(rest) > heldout_seq_len + 1 else None)
    else:
        images, labels = _calib_images(loaded, path, cfg.seed)
        n = cfg.samples or 256
        if cfg.samples and n > len(images):
            note(f"{path} holds {len(images)} images: calibrating on {len(images)}, not {n}")
        loop = image_forward_loop(images, n)
        held = ("vim", images[n:], labels[n:]) if len(images) > n and labels is not None else None   # flat: unlabelled
    loop.source = path
    return loop, held


def eval_data(loaded, eval_cfg):
    """The evaluation set as score_samples takes it (`eval_cfg` is an evaluate.EvalConfig)."""
    from mq_deploy.evaluate import _default_data, vim_data

    data = eval_cfg.data or _default_data(loaded)
    if loaded.architecture == "mamba_lm":
        from mq_deploy.data.tokenizer import tokenizer_for
        from mq_deploy.evaluate import lm_token_windows

        w, nbytes = lm_token_windows(data, eval_cfg.seq_len, eval_cfg.limit,
                                     tokenizer_for(loaded, getattr(eval_cfg, "tokenizer", None)))
        return ("lm", w, nbytes[:, 1:].sum(1))     # bytes the predicted tokens of each window cover
    images, labels = vim_data(loaded, data, eval_cfg.split, eval_cfg.limit)
    if labels is None:
        raise MQUserError(f"{data}: a flat folder has no labels; top-1 needs the ImageFolder layout "
                          "(one subfolder per class)")
    return ("vim", images, labels)


def score_samples(model, data, batch: int | None = None):
    """Per-sample scores (metric, numerator, denominator); the metric is sum(num) / sum(den): LM windows:
    bits of the predicted tokens / the UTF-8 bytes they cover (bits per byte; a BPE token covers
    several); images: correct (1/0) / 1 (top-1)."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    num = []
    with torch.no_grad():
        if data[0] == "lm":
            w = torch.from_numpy(np.ascontiguousarray(data[1]).astype(np.int64))
            bs = batch or 8
            for i in range(0, len(w), bs):
                xb = w[i:i + bs]
                logits = model(xb[:, :-1]).double()
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="none")
                num.append((ce.reshape(len(xb), -1).sum(1) / math.log(2)).numpy())
            metric = "bits_per_byte"
            den = (np.asarray(data[2], dtype=np.float64) if len(data) > 2
                   else np.full(len(w), w.shape[1] - 1, dtype=np.float64))
        else:
            images, labels = data[1], np.asarray(data[2])
            bs = batch or 256
            for i in range(0, len(labels), bs):
                pred = model(images[i:i + bs]).argmax(-1).numpy()
                num.append((pred == labels[i:i + bs]).astype(np.float64))
            metric, den = "top1", np.ones(len(labels))
    num = np.concatenate(num)
    if not np.all(np.isfinite(num)):
        raise MQUserError("the model's outputs are not finite on the evaluation data")
    return metric, num, den


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int32)


def interval(stat) -> list:
    import numpy as np

    lo, hi = np.percentile(stat, [2.5, 97.5])
    return [float(lo), float(hi)]


def _resampled(score, idx):
    num, den = score
    return num[idx].sum(1) / den[idx].sum(1)


def _value(score) -> float:
    return float(score[0].sum() / score[1].sum())


def paired_stats(score, ref, idx) -> dict:
    """value and delta vs `ref` (the same samples; each a (num, den) pair) with paired-bootstrap 95 %
    intervals, and the relative delta."""
    v, r = _resampled(score, idx), _resampled(ref, idx)
    value, base = _value(score), _value(ref)
    out = {"value": value, "ci95": interval(v), "delta": value - base, "delta_ci95": interval(v - r)}
    if base != 0:
        out["relative"] = value / base - 1
        if (r != 0).all():      # a resample can score 0 (top-1 on a few images): no relative interval then
            out["relative_ci95"] = interval(v / r - 1)
    return out


def parse_list(text: str, allowed, what: str):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise MQUserError(f"unknown {what} {bad or text!r} (choose from {', '.join(allowed)})")
    return items


def prepared_recipe(model_path: str, rcfg: RecipeConfig, calib: CalibConfig, hessians: bool = False):
    """(loaded model after the recipe's transforms, its Calibrated observers) — one calibration pass."""
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.recipes import calibrate_activations, get_recipe

    loaded = load_model(model_path)
    loop = calibration_loop(loaded, calib)
    get_recipe(rcfg.recipe).transform(loaded.model, loop, rcfg)
    cal = calibrate_activations(loaded.model, loop, rcfg, hessians=hessians) if get_recipe(rcfg.recipe).quantized \
        else None
    return loaded, cal


def quantized_copy(model, cal, wbits: int, abits: int, weight_rounding: str = "rtn", kv_cache: str = "fp32"):
    import copy

    from mq_deploy.quant.fakequant import QuantConfig
    from mq_deploy.quant.recipes import quantize_calibrated

    m = copy.deepcopy(model)
    quantize_calibrated(m, cal, QuantConfig(wbits, abits, kv_cache=kv_cache), weight_rounding)
    return m


def compare(model_path: str, recipes, bits, calib: CalibConfig, eval_cfg, progress=None, alpha: float = 0.5,
            percentile: float | None = None, observer: str | None = None, weight_rounding: str = "rtn",
            klt_source: str = "last", resamples: int = 1000, seed: int = 0, data=None,
            ssm_scales=("per_tensor",), kv_cache=("fp32",)) -> dict:
    """Evaluate every recipe at every bit width on the same samples. Returns {"rows": [...], "pairs": [...]}.

    `observer` overrides every recipe's default observers; `data` (as eval_data returns it) replaces the
    evaluation set (calibration_split's held-out part, for choosing defaults). `ssm_scales`: the scan
    inputs' scale granularities to compare (QuantConfig.ssm_scales; each calibrates anew); a row of a
    granularity other than per_tensor is labelled RECIPE/GRANULARITY. `kv_cache`: the attention layers' KV cache
    storages to compare (QuantConfig.kv_cache; the same calibration pass), an int8 row labelled LABEL+kv-int8."""
    from mq_deploy.calib.spec import PERCENTILE_DEFAULT
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.fakequant import SSM_SCALES, QuantConfig

    percentile = PERCENTILE_DEFAULT if percentile is None else percentile
    for b in bits:
        if b not in BITS:
            raise MQUserError(f"unknown bit width {b!r} (choose from {', '.join(BITS)})")
    loaded = load_model(model_path)
    data = data if data is not None else eval_data(loaded, eval_cfg)
    t0 = time.time()
    metric, *fp_scores = score_samples(loaded.model, data, eval_cfg.batch)
    idx = bootstrap_indices(len(fp_scores[0]), resamples, seed)
    scores = {("fp", "fp"): fp_scores}
    rows = []

    def add(recipe, b, s, seconds, extra=None):
        row = {"recipe": recipe, "bits": b, "metric": metric, **paired_stats(s, fp_scores, idx),
               "samples": int(len(s[0])), "seconds": round(seconds, 1), **(extra or {})}
        rows.append(row)
        scores[(recipe, b)] = s
        if progress:
            progress(row)

    add("fp", "fp", fp_scores, time.time() - t0)
    for mode in ssm_scales:
        if mode not in SSM_SCALES:
            raise MQUserError(f"unknown scale granularity {mode!r} (choose from {', '.join(SSM_SCALES)})")
    from mq_deploy.families.attention.config import KV_CACHE, attention_configs

    for kv in kv_cache:
        if kv not in KV_CACHE:
            raise MQUserError(f"unknown KV cache storage {kv!r} (choose from {', '.join(KV_CACHE)})")
    if "int8" in kv_cache and not attention_configs(loaded.config):
        raise MQUserError("--kv-cache int8: the model has no attention layer, so no KV cache to store as int8")
    for recipe in recipes:
        if recipe == "fp":
            continue
        for mode in ssm_scales:
            rcfg = RecipeConfig(recipe, QuantConfig(ssm_scales=mode), alpha=alpha, percentile=percentile,
                                observer=observer, weight_rounding=weight_rounding, klt_source=klt_source)
            label = recipe if mode == "per_tensor" else f"{recipe}/{mode}"
            t0 = time.time()
            prepared, cal = prepared_recipe(model_path, rcfg, calib, hessians=weight_rounding == "gptq")
            t_cal = time.time() - t0
            for b in bits:
                for kv in kv_cache:
                    t1 = time.time()
                    m = quantized_copy(prepared.model, cal, *BITS[b], weight_rounding, kv_cache=kv)
                    _, *s = score_samples(m, data, eval_cfg.batch)
                    add(label + ("" if kv == "fp32" else f"+kv-{kv}"), b, s, t_cal + time.time() - t1,
                        {"observer": str(cal.spec), "weight_rounding": weight_rounding, "ssm_scales": mode,
                         "kv_cache": kv})
                    t_cal = 0.0
    pairs = []
    for b in bits:
        for mode in ssm_scales:
            sfx = "" if mode == "per_tensor" else f"/{mode}"
            if (f"mambaquant{sfx}", b) in scores and (f"quarot{sfx}", b) in scores:
                pairs.append(pair_row(f"mambaquant{sfx}", f"quarot{sfx}", b, scores, idx))
        for recipe in recipes:
            if len(ssm_scales) > 1 and (f"{recipe}/grouped", b) in scores and (recipe, b) in scores:
                pairs.append(pair_row(f"{recipe}/grouped", recipe, b, scores, idx))
            if (f"{recipe}+kv-int8", b) in scores and (recipe, b) in scores:
                pairs.append(pair_row(f"{recipe}+kv-int8", recipe, b, scores, idx))
    return {"model": model_path, "metric": metric, "samples": int(len(fp_scores[0])), "resamples": resamples,
            "rows": rows, "pairs": pairs}


def pair_row(a: str, b: str, bits: str, scores: dict, idx) -> dict:
    """a minus b at one bit width, with its paired-bootstrap interval (lower is better for bits/byte)."""
    sa, sb = scores[(a, bits)], scores[(b, bits)]
    return {"a": a, "b": b, "bits": bits, "diff": _value(sa) - _value(sb),
            "diff_ci95": interval(_resampled(sa, idx) - _resampled(sb, idx))}


__all__ = ["BITS", "CalibConfig", "EXPORTABLE_ABITS", "RECIPES", "calibration_loop", "calibration_split", "compare",
           "eval_data", "paired_stats", "parse_list", "prepared_recipe", "quantized_copy", "recipe_names",
           "score_samples"]
