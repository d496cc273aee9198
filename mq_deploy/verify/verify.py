"""`mq-deploy verify`: run an artifact (ONNX or TensorRT engine) and the PyTorch reference on the same
data, report how far apart their outputs are and the end metric of each, and decide pass/fail.

Per output: max / mean / median absolute and relative error (relative to |reference|, floored at
1e-6 of the reference's largest magnitude), per-row cosine similarity (mean and min), top-1
agreement. Checks (each only reported when it applies):
- --atol / --rtol with --check-error-stat (max, mean or median), as polygraphy does: an output passes
  when stat(|a - r|) <= atol or stat(|a - r| / |r|) <= rtol;
- mean cosine >= --min-cosine (default 0.999) and top-1 agreement >= --min-top1-agreement (0.99);
- end-metric relative difference <= --max-metric-delta (0.002, i.e. 0.2 %);
- the preprocessing the artifact carries for `run` and Triton (Vim: image size, channels, mean, std in its
  metadata; LM: the tokenizer it carries, which must encode the data as the reference's does) equals the
  reference's. (Metadata that is invalid in itself, a std of 0 or NaN, is refused when the file is opened.)

End metric: top-1 (Vim); bits per byte for text data, as `mq-deploy eval` reports it (the NLL in bits of
the predicted tokens over the UTF-8 bytes they cover, from the tokenizer's offsets); bits per token only
for `--data IDS.npy`, which has no text to count bytes in (the report says which).

The noise floor. A quantized model rounds at every quant point, so a tiny difference in float rounding
order (ONNX Runtime sums in another order than PyTorch) flips a few int8 codes, and a deep or untrained
model can amplify those flips until the gates fail although the export is right. When a gate fails,
verify measures how far the reference moves from itself under another valid rounding order: every
quantizer's input (or, in a float model, every mixer's input) multiplied by (1 +- e), the sign drawn per
element, e = 2^-23 (NOISE_REL: one or two units in the last place of a float32, as another summation
order gives). One draw varies a lot on a chaotic model, so the reference runs NOISE_DRAWS (3) times and
the floor is the worst deviation of each statistic (on the first NOISE_SAMPLES = 256 images or windows,
which bounds its cost at three more reference passes over them). Each failed check is then compared with the same
statistic of the floor: when the artifact's deviation is at most NOISE_FACTOR (3) times the reference's
own (top-1: disagreeing rows <= 3 x the reference's + 1), the verdict is WITHIN NOISE FLOOR
(exit 3): the model is too sensitive for the gates and the artifact is as close to the reference as the
reference is to itself. Otherwise FAILED (exit 1). Models whose gates pass (the trained samples) are
judged by the gates alone (PASSED, exit 0) and the noise floor is not measured.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from mq_deploy.errors import MQUserError
from mq_deploy.verify.compare import compare_outputs

STATS = ("max", "mean", "median")
NOISE_REL = 2.0 ** -23          # float32's machine epsilon: one unit of rounding
NOISE_FACTOR = 3.0              # a failed check within 3x the reference's own deviation is the model's sensitivity
NOISE_DRAWS = 3                 # perturbed reference runs; the floor is the worst of them (one draw varies a lot)
NOISE_SAMPLES = 256             # the floor is measured on the first batches holding this many images / windows
VERDICTS = {"passed": 0, "failed": 1, "within_noise_floor": 3}     # verdict -> exit code of `mq-deploy verify`


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


_BITS_BLOCK_BYTES = 64 << 20     # float64 logits per block of _bits (a 256000-token vocabulary: 32 rows)


def _bits(logits: np.ndarray, targets: np.ndarray, nbytes: int | None = None) -> float:
    """Next-token cross-entropy in bits (float64), per byte covered when nbytes is given, else per token. A block of
    rows at a time: two windows of 512 positions over a 256000-token vocabulary are 2 GiB in float64, and the
    log-softmax as much again."""
    import torch

    from mq_deploy.verify.metrics import nats

    lg = logits.reshape(-1, logits.shape[-1])
    tg = np.asarray(targets, np.int64).reshape(-1)
    rows = max(1, _BITS_BLOCK_BYTES // (8 * max(1, lg.shape[1])))
    total = sum(nats(torch.from_numpy(lg[i:i + rows]).double(), torch.from_numpy(tg[i:i + rows]))
                for i in range(0, len(lg), rows))
    return total / math.log(2) / (nbytes if nbytes else targets.size)


def _lm_batches(reference, cfg: VerifyConfig, step: bool):
    from mq_deploy.evaluate import _default_data

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
        nbytes = None               # token ids only: no text to count bytes in
    else:   # text through the model's tokenizer (--tokenizer, its tokenizer.json, or bytes for vocab 256)
        from mq_deploy.data.tokenizer import tokenizer_for
        from mq_deploy.evaluate import lm_token_windows

        codec = tokenizer_for(loaded, cfg.tokenizer)
        path = os.path.abspath(cfg.data or _default_data(loaded))
        w, nbytes = lm_token_windows(path, cfg.seq_len, cfg.limit or 32, codec)
    from mq_deploy.families import zero_states

    bs = cfg.batch or 8
    for i in range(0, len(w), bs):
        ids = np.ascontiguousarray(w[i:i + bs, :-1]).astype(np.int64)
        feeds = {"input_ids": ids}
        if step:                  # empty states (zeros, a cache's length 0), laid out as the step graph's
            feeds.update(zero_states(loaded.config, len(ids)))
        yield feeds, (w[i:i + bs, 1:], None if nbytes is None else int(nbytes[i:i + bs, 1:].sum()))
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
        yield {"images": images[i:i + bs].numpy()}, (labels[i:i + bs], None)
    yield None, path


def _batches(reference_runner, cfg: VerifyConfig, step: bool):
    loaded = reference_runner.loaded
    if loaded.architecture == "mamba_lm":
        return _lm_batches(reference_runner, cfg, step)
    return _vim_batches(reference_runner, cfg)


def _joined(parts: dict) -> dict:
    """Batches stacked; the states' batch axis is 1 (layers first)."""
    return {k: np.concatenate(v, axis=1 if k.endswith("_out") and k != "logits" else 0) for k, v in parts.items()}


def _end_metric(loaded, logits, targets, nbytes):
    if loaded.architecture == "mamba_lm":
        return _bits(logits, targets, nbytes)
    return float((logits.argmax(-1) == targets).mean())


def _checks(outputs: dict, delta: float, metric: str, cfg: VerifyConfig) -> list:
    checks = []
    for name, o in outputs.items():
        if cfg.atol is not None or cfg.rtol is not None:
            s = cfg.check_error_stat
            ok_abs = cfg.atol is not None and o[f"{s}_abs"] <= cfg.atol
            ok_rel = cfg.rtol is not None and o[f"{s}_rel"] <= cfg.rtol
            checks.append({"check": f"{name}: {s} abs <= {cfg.atol} or {s} rel <= {cfg.rtol}", "kind": "tolerance",
                           "output": name, "value": [o[f"{s}_abs"], o[f"{s}_rel"]], "passed": bool(ok_abs or ok_rel)})
        if name == "logits":
            checks.append({"check": f"{name}: mean cosine >= {cfg.min_cosine}", "kind": "cosine", "output": name,
                           "value": o["cosine_mean"], "passed": o["cosine_mean"] >= cfg.min_cosine})
            checks.append({"check": f"{name}: top-1 agreement >= {cfg.min_top1_agreement}", "kind": "top1",
                           "output": name, "value": o["top1_agreement"],
                           "passed": o["top1_agreement"] >= cfg.min_top1_agreement})
    checks.append({"check": f"{metric}: relative difference <= {cfg.max_metric_delta}", "kind": "metric",
                   "value": delta, "passed": delta <= cfg.max_metric_delta})
    return checks


def _deviation(check: dict, outputs: dict, delta: float, cfg: VerifyConfig) -> float:
    """How far from the reference a check measured (0 = identical), for comparing with the noise floor."""
    kind = check["kind"]
    if kind == "metric":
        return delta
    o = outputs[check["output"]]
    if kind == "cosine":
        return max(0.0, 1.0 - o["cosine_mean"])
    if kind == "top1":
        return 1.0 - o["top1_agreement"]
    s = cfg.check_error_stat       # tolerance: the smaller of the two normalised misses
    return min(o[f"{s}_abs"] / cfg.atol if cfg.atol else math.inf, o[f"{s}_rel"] / cfg.rtol if cfg.rtol else math.inf)


def _within_floor(check: dict, artifact: float, noise: float, rows: int) -> bool:
    if check["kind"] == "top1":     # disagreeing rows are counts: one row of slack
        return round(artifact * rows) <= NOISE_FACTOR * round(noise * rows) + 1
    return artifact <= NOISE_FACTOR * noise


def _is_step(runner) -> bool:
    """A decode-step graph: its metadata says so (a TensorRT engine carries none: its state inputs do)."""
    art = getattr(runner, "artifact", None)
    return getattr(art, "graph", None) == "step" or "conv_state" in runner.input_specs


def verify(artifact_runner, reference_runner, cfg: VerifyConfig, progress=None) -> dict:
    """Run both runners over the data; return {"outputs", "metrics", "checks", "passed", "verdict",
    "noise_floor"} (see the module doc for the verdicts)."""
    from tqdm import tqdm

    loaded = reference_runner.loaded
    lm = loaded.architecture == "mamba_lm"
    step = lm and _is_step(artifact_runner)
    got, ref, targets, nbytes = {}, {}, [], []
    data_path = None
    with tqdm(desc="verify", unit="batch", disable=None if progress is None else not progress, leave=False) as bar:
        for feeds, target in _batches(reference_runner, cfg, step):
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
            targets.append(np.asarray(target[0]))
            nbytes.append(target[1])
            bar.update(1)
    if not targets:
        raise MQUserError("verify: the data gave no samples")
    counts = [len(x) for x in targets]
    cat, got = _joined(got), None          # (the batches' arrays go as they are joined: at a 256000-token
    cat_ref, ref = _joined(ref), None      # vocabulary, two windows of logits are 1 GiB a side)
    outputs = {k: compare_outputs(cat[k], cat_ref[k], classes=k == "logits") for k in cat_ref}
    t = np.concatenate(targets)
    total_bytes = None if any(b is None for b in nbytes) else int(sum(nbytes))
    metric = ("bits_per_byte" if total_bytes else "bits_per_token") if lm else "top1"
    a_val, r_val = _end_metric(loaded, cat["logits"], t, total_bytes), _end_metric(loaded, cat_ref["logits"], t,
                                                                                   total_bytes)
    delta = abs(a_val - r_val) / max(abs(r_val), 1e-12)
    metrics = {"metric": metric, "artifact": a_val, "reference": r_val, "rel_delta": delta, "samples": int(t.size),
               "data": data_path}
    if lm:
        metrics["bytes"] = total_bytes
    checks = _checks(outputs, delta, metric, cfg) + preprocessing_checks(artifact_runner, reference_runner, cfg)
    verdict, floor = "passed", None
    failed = [c for c in checks if not c["passed"]]
    if failed:
        verdict = "failed"
        if all("kind" in c and c["kind"] != "preprocessing" for c in failed):
            nb = next((i + 1 for i in range(len(counts)) if sum(counts[:i + 1]) >= NOISE_SAMPLES), len(counts))
            n = sum(counts[:nb])          # the first nb batches, along each output's batch axis (as _joined)
            sub_ref = {k: (v[:, :n] if k.endswith("_out") and k != "logits" else v[:n]) for k, v in cat_ref.items()}
            sub_bytes = None if total_bytes is None else int(sum(nbytes[:nb]))
            floor = noise_floor(reference_runner, cfg, step, sub_ref, np.concatenate(targets[:nb]), sub_bytes,
                                progress, max_batches=nb)
            rows = int(np.prod(sub_ref["logits"].shape[:-1]))
            for c in failed:
                c["artifact_deviation"] = _deviation(c, outputs, delta, cfg)
                c["noise_deviation"] = _deviation(c, floor["outputs"], floor["rel_delta"], cfg)
                c["within_noise_floor"] = _within_floor(c, c["artifact_deviation"], c["noise_deviation"], rows)
            if all(c["within_noise_floor"] for c in failed):
                verdict = "within_noise_floor"
    return {"outputs": outputs, "metrics": metrics, "checks": checks, "passed": verdict == "passed",
            "verdict": verdict, "noise_floor": floor}


def _worst(stats: list) -> dict:
    """Per-output statistics of several draws -> the worst of each (smallest cosine / agreement, largest error)."""
    out = {}
    for name in stats[0]:
        out[name] = {k: (min if k.startswith(("cosine", "top1")) else max)(s[name][k] for s in stats)
                     for k in stats[0][name]}
    return out


def noise_floor(reference_runner, cfg: VerifyConfig, step: bool, ref_out: dict, targets, total_bytes,
                progress=None, max_batches: int | None = None) -> dict:
    """The reference against itself under another valid rounding order (TorchRunner.perturbed with NOISE_REL),
    NOISE_DRAWS times, on the first max_batches batches of the data (ref_out, targets and total_bytes are
    those batches'): {"outputs": the worst per-output statistics, "rel_delta": the largest end-metric
    difference, "rel", "draws", "factor", "samples"}. Per-output statistics are means or rates, so they
    compare with the artifact's over all of the data."""
    from tqdm import tqdm

    loaded = reference_runner.loaded
    r_val = _end_metric(loaded, ref_out["logits"], targets, total_bytes)
    stats, deltas = [], []
    for seed in range(NOISE_DRAWS):
        parts = {}
        with reference_runner.perturbed(NOISE_REL, seed=seed), \
                tqdm(desc=f"noise floor {seed + 1}/{NOISE_DRAWS}", unit="batch",
                     disable=None if progress is None else not progress, leave=False) as bar:
            for i, (feeds, _) in enumerate(_batches(reference_runner, cfg, step)):
                if feeds is None or (max_batches is not None and i >= max_batches):
                    break
                for name, v in reference_runner.infer(feeds).items():
                    parts.setdefault(name, []).append(np.asarray(v))
                bar.update(1)
        noisy = _joined(parts)
        stats.append({k: compare_outputs(noisy[k], ref_out[k], classes=k == "logits") for k in ref_out})
        n_val = _end_metric(loaded, noisy["logits"], targets, total_bytes)
        deltas.append(abs(n_val - r_val) / max(abs(r_val), 1e-12))
    return {"outputs": _worst(stats), "rel_delta": max(deltas), "rel": NOISE_REL, "draws": NOISE_DRAWS,
            "factor": NOISE_FACTOR, "samples": int(len(targets))}


def preprocessing_checks(artifact_runner, reference_runner, cfg: VerifyConfig) -> list:
    """What `run` and Triton take from the artifact rather than from the reference: a Vim's image size,
    channels, mean and std (its metadata), an LM's tokenizer (it must encode the data as the reference's
    tokenizer does). Verify feeds both runners the same tensors, so only this check sees them."""
    art = getattr(artifact_runner, "artifact", None)
    acfg = getattr(art, "config", None)
    loaded = reference_runner.loaded
    rcfg = loaded.config
    if acfg is None:                 # a TensorRT engine carries no metadata
        return []
    out = []
    if loaded.architecture == "vim":
        fields = ("in_chans", "img_size", "image_mean", "image_std")
        diff = [f"{f} {getattr(acfg, f)} (reference {getattr(rcfg, f)})" for f in fields
                if not np.allclose(np.asarray(getattr(acfg, f), np.float64), np.asarray(getattr(rcfg, f), np.float64),
                                   rtol=1e-6, atol=0)]
        out.append({"check": "preprocessing: the artifact's image size, channels, mean and std equal the reference's"
                             + (f" ({'; '.join(diff)})" if diff else ""), "kind": "preprocessing", "value": diff,
                    "passed": not diff})
    elif cfg.data is None or not cfg.data.endswith(".npy"):
        from mq_deploy.data.tokenizer import read_text_file, tokenizer_for, tokenizer_for_artifact

        theirs = tokenizer_for_artifact(art, None, artifact_runner.path)
        if theirs is None:
            out.append({"check": "preprocessing: the artifact carries a tokenizer (generate and Triton need one)",
                        "kind": "preprocessing", "value": None, "passed": False})
            return out
        from mq_deploy.evaluate import _default_data

        ours = tokenizer_for(loaded, cfg.tokenizer)
        raw = read_text_file(os.path.abspath(cfg.data or _default_data(loaded)))[:1 << 16]
        text = raw if ours.kind == theirs.kind == "bytes" else raw.decode("utf-8", errors="ignore")
        a_ids, r_ids = theirs.encode(text)[0], ours.encode(text)[0]
        same = len(a_ids) == len(r_ids) and bool((a_ids == r_ids).all())
        out.append({"check": "preprocessing: the artifact's tokenizer encodes the data as the reference's does "
                             f"({len(r_ids)} tokens of its first {len(raw)} bytes)", "kind": "preprocessing",
                    "value": same, "passed": same})
    return out


def verify_paths(artifact: str, reference: str, cfg: VerifyConfig, *, custom_op_library: str | None = None,
                 plugins=(), threads: int | None = None, stream: str = "auto") -> dict:
    """`mq-deploy verify`: open the artifact (ONNX in ONNX Runtime, or a TensorRT engine) and the PyTorch
    reference checkpoint, check they belong together, and compare them. stream (loaders.streams): the
    reference reads its layers in one at a time as it runs (a large LM), "on", "off" or "auto"."""
    from mq_deploy.backends.base import ENGINE_SUFFIXES, open_runner
    from mq_deploy.models.loaders import streams
    from mq_deploy.quant.qcheckpoint import load
    from mq_deploy.verify.torch_runner import TorchRunner

    lazy = streams(reference, stream)
    # A streamed (large) model: ONNX Runtime maps the artifact's external data and runs from it; prepacking would
    # copy every int8 weight and the float head into packed buffers of their own (anonymous memory as large as
    # the weights; at the mamba2-8b-2l shape 4.2 GiB of its 8.1 GiB peak, the 4096 x 256000 head), for a session
    # that runs a few batches. The packed and unpacked kernels agree to float rounding (tests/test_streamed.py).
    runner = open_runner(artifact, custom_op_library=custom_op_library, plugins=plugins, threads=threads,
                         prepack=not lazy)
    proto = getattr(runner, "proto", None)
    if proto is not None and not artifact.endswith(ENGINE_SUFFIXES):
        from mq_deploy.export.onnx_file import require_mq_export

        require_mq_export(proto, artifact, "verify")
    loaded = load(reference, lazy=lazy)
    kind = runner.artifact.kind
    want = {"mamba_lm": "lm", "vim": "vim"}.get(loaded.architecture, loaded.architecture)
    if kind is not None and kind != want:
        raise MQUserError(f"{artifact} is a {kind} export but {reference} is a {loaded.architecture} checkpoint; "
                          "verify an artifact against the checkpoint it was exported from")
    if getattr(runner.artifact, "kv_cache", None) == "sentinel":
        raise MQUserError(f"{artifact} is a Triton repository's copy of a step graph (its KV caches carry the slot "
                          "Triton's implicit state starts with); verify the export it was written from")
    step = _is_step(runner)
    state_dtype = getattr(runner.artifact.config, "state_dtype", "float32")
    if step and state_dtype != "float32":       # the reference stores its states as the artifact does
        from mq_deploy.export.exporter import quant_spec, set_state_dtype

        set_state_dtype(loaded, state_dtype, quant_spec(loaded))
    ref = TorchRunner(loaded, step=step)
    names = set(runner.input_specs)
    if names != set(ref.input_specs):
        raise MQUserError(f"{artifact} takes inputs {', '.join(sorted(names))}, but the reference {reference} takes "
                          f"{', '.join(sorted(ref.input_specs))}; they are not the same kind of model")
    return verify(runner, ref, cfg)


METRIC_WORDS = {"bits_per_byte": "bits per byte (NLL in bits of the predicted tokens / the UTF-8 bytes they "
                                   "cover, as `mq-deploy eval` reports)",
                "bits_per_token": "bits per token (token ids given as .npy: no text to count bytes in)",
                "top1": "top-1 accuracy"}


def format_report(rep: dict, artifact: str, reference: str) -> str:
    lines = [f"verify {artifact} against {reference}"]
    for name, o in rep["outputs"].items():
        lines.append(f"  {name}: max abs {o['max_abs']:.3g}  mean abs {o['mean_abs']:.3g}  median abs "
                     f"{o['median_abs']:.3g}  mean rel {o['mean_rel']:.3g}  cosine mean {o['cosine_mean']:.6f} "
                     f"(min {o['cosine_min']:.4f})"
                     + (f"  top-1 agreement {o['top1_agreement'] * 100:.2f}%" if "top1_agreement" in o else ""))
    m = rep["metrics"]
    lines.append(f"  {METRIC_WORDS.get(m['metric'], m['metric'])}: artifact {m['artifact']:.4f}  reference "
                 f"{m['reference']:.4f}  (relative difference {m['rel_delta'] * 100:.3f}%, {m['samples']} "
                 f"{'tokens' if m['metric'].startswith('bits') else 'samples'}"
                 + (f" covering {m['bytes']} bytes" if m.get("bytes") else "") + f" of {m['data']})")
    for c in rep["checks"]:
        note = ""
        if "within_noise_floor" in c:
            note = (f"  (artifact {c['artifact_deviation']:.3g} vs the reference's own {c['noise_deviation']:.3g}: "
                    f"{'within' if c['within_noise_floor'] else 'beyond'} {NOISE_FACTOR:g}x)")
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['check']}{note}")
    floor = rep.get("noise_floor")
    if floor:
        lo = floor["outputs"].get("logits", {})
        lines.append(f"  noise floor (the reference against itself, each quantizer input x (1 +- {floor['rel']:.3g}), "
                     f"worst of {floor['draws']} draws on {floor['samples']} samples): logits cosine mean "
                     f"{lo.get('cosine_mean', float('nan')):.6f}, "
                     "top-1 agreement "
                     f"{lo.get('top1_agreement', float('nan')) * 100:.2f}%, {m['metric']} relative difference "
                     f"{floor['rel_delta'] * 100:.3f}%")
    verdict = rep.get("verdict", "passed" if rep["passed"] else "failed")
    if verdict == "within_noise_floor":
        lines.append("WITHIN NOISE FLOOR: the gates cannot be met on this model; the artifact deviates from the "
                     f"reference no more than {NOISE_FACTOR:g}x as much as the reference deviates from itself under "
                     "another valid rounding order (the model's sensitivity, not an export error)")
    else:
        lines.append(verdict.upper())
    return "\n".join(lines)
