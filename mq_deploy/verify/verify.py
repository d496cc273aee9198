"""`mq-deploy verify`: run an artifact (ONNX or TensorRT engine) and the PyTorch reference on the same
data, report how far apart their outputs are and the end metric of each, and decide pass/fail.

Per output: max / mean / median absolute and relative error (relative to |reference|, floored at
1e-6 of the reference's largest magnitude), per-row cosine similarity (mean and min), top-1
agreement. Checks (each only reported when it applies):
- --atol / --rtol with --check-error-stat (max, mean or median), as polygraphy does: an output passes
  when stat(|a - r|) <= atol or stat(|a - r| / |r|) <= rtol;
- mean cosine >= --min-cosine (default 0.999) and top-1 agreement >= --min-top1-agreement (0.99);
- end-metric relative difference <= --max-metric-delta (0.002, i.e. 0.2 %).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from mq_deploy.errors import MQUserError
from mq_deploy.verify.compare import compare_outputs

STATS = ("max", "mean", "median")


@dataclass
class VerifyConfig:
    data: str | None = None
    limit: int | None = None            # LM windows / images
    seq_len: int = 256
    batch: int | None = None
    atol: float | None = None
    rtol: float | None = None
    check_error_stat: str = "mean"
    min_cosine: float = 0.999
    min_top1_agreement: float = 0.99
    max_metric_delta: float = 0.002
    tokenizer: str | None = None        # LM text: tokenizer.json or its folder (default: the checkpoint's)

    def __post_init__(self):
        """Every threshold and size of the verify flag group is range-checked here, once: a gate that no
        output can fail (--min-cosine -5, a negative tolerance) is refused, not silently passed."""
        if self.check_error_stat not in STATS:
            raise MQUserError(f"--check-error-stat must be one of {', '.join(STATS)}, got {self.check_error_stat!r}")

        def number(name, v, lo=0.0, hi=None, why=""):
            flag = "--" + name.replace("_", "-")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo \
                    or (hi is not None and v > hi):
                rng = f"from {lo:g} to {hi:g}" if hi is not None else f">= {lo:g}"
                raise MQUserError(f"{flag} must be a finite number {rng}{why}, got {v}")

        for name in ("atol", "rtol"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name))
        number("min_cosine", self.min_cosine, 0.0, 1.0, " (a mean cosine; below 0 it would pass outputs that point "
               "the other way)")
        number("min_top1_agreement", self.min_top1_agreement, 0.0, 1.0, " (a fraction: 0.99 = 99 %)")
        number("max_metric_delta", self.max_metric_delta, 0.0, None, " (relative: 0.002 = 0.2 %)")
        for name in ("limit", "batch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise MQUserError(f"--{name} must be a positive integer, got {v}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len <= 1:
            raise MQUserError(f"--seq-len must be at least 2, got {self.seq_len}")


def _bits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token cross-entropy in bits (float64)."""
    import torch

    from mq_deploy.verify.metrics import nats

    total = nats(torch.from_numpy(logits).double(), torch.from_numpy(np.asarray(targets, np.int64)))
    return total / targets.size / math.log(2)


def _lm_batches(reference, cfg: VerifyConfig, step: bool):
    from mq_deploy.evaluate import _default_data, lm_windows

    loaded = reference.loaded
    vocab = loaded.config.vocab_size
    if cfg.data and cfg.data.endswith(".npy"):      # token ids [n, L+1] from any tokenizer
        path = os.path.abspath(cfg.data)
        try:
            w = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise MQUserError(f"{path}: not a readable .npy array ({why})") from None
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 2 or not np.issubdtype(w.dtype, np.integer):
            raise MQUserError(f"{path}: expected integer token ids [windows >= 1, length + 1 >= 2], got {w.dtype} "
                              f"{list(w.shape)}")
        if w.min() < 0 or w.max() >= vocab:
            raise MQUserError(f"{path}: token ids must lie in [0, {vocab})")
        w = w[:cfg.limit] if cfg.limit else w
    else:   # text through the model's tokenizer (--tokenizer, its tokenizer.json, or bytes for vocab 256)
        from mq_deploy.data.tokenizer import tokenizer_for

        codec = tokenizer_for(loaded, cfg.tokenizer)
        path = os.path.abspath(cfg.data or _default_data(loaded))
        w = lm_windows(path, cfg.seq_len, cfg.limit or 32, codec)
    m = loaded.config.mixer
    bs = cfg.batch or 8
    for i in range(0, len(w), bs):
        ids = np.ascontiguousarray(w[i:i + bs, :-1]).astype(np.int64)
        feeds = {"input_ids": ids}
        if step:
            n = len(ids)
            feeds["conv_state"] = np.zeros((loaded.config.n_layer, n, m.d_inner, m.d_conv - 1), np.float32)
            feeds["ssm_state"] = np.zeros((loaded.config.n_layer, n, m.d_inner, m.d_state), np.float32)
        yield feeds, w[i:i + bs, 1:]
    yield None, path


def _vim_batches(reference, cfg: VerifyConfig):
    from mq_deploy.evaluate import _default_data, vim_data

    loaded = reference.loaded
    path = os.path.abspath(cfg.data or _default_data(loaded))
    images, labels = vim_data(loaded, path, "test", cfg.limit)
    if labels is None:     # a flat image folder: no labels, the outputs are still compared
        labels = np.full(len(images), -1, np.int64)
    bs = cfg.batch or 64
    for i in range(0, len(labels), bs):
        yield {"images": images[i:i + bs].numpy()}, labels[i:i + bs]
    yield None, path


def verify(artifact_runner, reference_runner, cfg: VerifyConfig, progress=None) -> dict:
    """Run both runners over the data; return {"outputs", "metrics", "checks", "passed", ...}."""
    from tqdm import tqdm

    loaded = reference_runner.loaded
    lm = loaded.architecture == "mamba_lm"
    step = lm and "conv_state" in artifact_runner.input_specs
    batches = _lm_batches(reference_runner, cfg, step) if lm else _vim_batches(reference_runner, cfg)
    got, ref, targets = {}, {}, []
    data_path = None
    with tqdm(desc="verify", unit="batch", disable=None if progress is None else not progress, leave=False) as bar:
        for feeds, target in batches:
            if feeds is None:
                data_path = target
                break
            a = artifact_runner.infer(feeds)
            r = reference_runner.infer(feeds)
            for name in r:
                if name not in a:
                    raise MQUserError(f"the artifact has no output {name!r} (it has {', '.join(a)})")
                got.setdefault(name, []).append(np.asarray(a[name]))
                ref.setdefault(name, []).append(np.asarray(r[name]))
            targets.append(np.asarray(target))
            bar.update(1)
    if not targets:
        raise MQUserError("verify: the data gave no samples")
    def joined(parts):   # batches stacked; the states' batch axis is 1 (layers first)
        return {k: np.concatenate(v, axis=1 if k.endswith("_state_out") else 0) for k, v in parts.items()}
    cat, cat_ref = joined(got), joined(ref)
    outputs = {k: compare_outputs(cat[k], cat_ref[k], classes=k == "logits") for k in cat_ref}
    t = np.concatenate(targets)
    if lm:
        metric = "bits_per_byte" if loaded.config.vocab_size == 256 else "bits_per_token"
        a_val, r_val = _bits(cat["logits"], t), _bits(cat_ref["logits"], t)
    else:
        metric = "top1"
        a_val = float((cat["logits"].argmax(-1) == t).mean())
        r_val = float((cat_ref["logits"].argmax(-1) == t).mean())
    delta = abs(a_val - r_val) / max(abs(r_val), 1e-12)
    metrics = {"metric": metric, "artifact": a_val, "reference": r_val, "rel_delta": delta, "samples": int(t.size),
               "data": data_path}
    checks = []
    for name, o in outputs.items():
        if cfg.atol is not None or cfg.rtol is not None:
            s = cfg.check_error_stat
            ok_abs = cfg.atol is not None and o[f"{s}_abs"] <= cfg.atol
            ok_rel = cfg.rtol is not None and o[f"{s}_rel"] <= cfg.rtol
            checks.append({"check": f"{name}: {s} abs <= {cfg.atol} or {s} rel <= {cfg.rtol}",
                           "value": [o[f"{s}_abs"], o[f"{s}_rel"]], "passed": bool(ok_abs or ok_rel)})
        if name == "logits":
            checks.append({"check": f"{name}: mean cosine >= {cfg.min_cosine}", "value": o["cosine_mean"],
                           "passed": o["cosine_mean"] >= cfg.min_cosine})
            checks.append({"check": f"{name}: top-1 agreement >= {cfg.min_top1_agreement}",
                           "value": o["top1_agreement"], "passed": o["top1_agreement"] >= cfg.min_top1_agreement})
    checks.append({"check": f"{metric}: relative difference <= {cfg.max_metric_delta}", "value": delta,
                   "passed": delta <= cfg.max_metric_delta})
    return {"outputs": outputs, "metrics": metrics, "checks": checks, "passed": all(c["passed"] for c in checks)}


def verify_paths(artifact: str, reference: str, cfg: VerifyConfig, *, custom_op_library: str | None = None,
                 plugins=(), threads: int | None = None) -> dict:
    """`mq-deploy verify`: open the artifact (ONNX in ONNX Runtime, or a TensorRT engine) and the PyTorch
    reference checkpoint, check they belong together, and compare them."""
    from mq_deploy.backends.base import ENGINE_SUFFIXES, open_runner
    from mq_deploy.quant.qcheckpoint import load
    from mq_deploy.verify.torch_runner import TorchRunner

    runner = open_runner(artifact, custom_op_library=custom_op_library, plugins=plugins, threads=threads)
    proto = getattr(runner, "proto", None)
    if proto is not None and not artifact.endswith(ENGINE_SUFFIXES):
        from mq_deploy.export.onnx_file import require_mq_export

        require_mq_export(proto, artifact, "verify")
    loaded = load(reference)
    kind = runner.meta.get("mq.kind") if runner.meta else None
    want = {"mamba_lm": "lm", "vim": "vim"}.get(loaded.architecture, loaded.architecture)
    if kind is not None and kind != want:
        raise MQUserError(f"{artifact} is a {kind} export but {reference} is a {loaded.architecture} checkpoint; "
                          "verify an artifact against the checkpoint it was exported from")
    step = "conv_state" in runner.input_specs
    ref = TorchRunner(loaded, step=step)
    names = set(runner.input_specs)
    if names != set(ref.input_specs):
        raise MQUserError(f"{artifact} takes inputs {', '.join(sorted(names))}, but the reference {reference} takes "
                          f"{', '.join(sorted(ref.input_specs))}; they are not the same kind of model")
    return verify(runner, ref, cfg)


def format_report(rep: dict, artifact: str, reference: str) -> str:
    lines = [f"verify {artifact} against {reference}"]
    for name, o in rep["outputs"].items():
        lines.append(f"  {name}: max abs {o['max_abs']:.3g}  mean abs {o['mean_abs']:.3g}  median abs "
                     f"{o['median_abs']:.3g}  mean rel {o['mean_rel']:.3g}  cosine mean {o['cosine_mean']:.6f} "
                     f"(min {o['cosine_min']:.4f})"
                     + (f"  top-1 agreement {o['top1_agreement'] * 100:.2f}%" if "top1_agreement" in o else ""))
    m = rep["metrics"]
    lines.append(f"  {m['metric']}: artifact {m['artifact']:.4f}  reference {m['reference']:.4f}  "
                 f"(relative difference {m['rel_delta'] * 100:.3f}%, {m['samples']} samples of {m['data']})")
    for c in rep["checks"]:
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['check']}")
    lines.append("PASSED" if rep["passed"] else "FAILED")
    return "\n".join(lines)
