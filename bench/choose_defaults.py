"""Choose MambaQuant's default observer (and KLT placement) on held-out CALIBRATION data, never the eval set.

For each sample model: the recipe's transforms run once on the calibration slice (LM: the first 32
windows of 512 bytes of data/calib.txt; Vim: the first 256 of the seed-0 shuffled calibration images),
one calibration pass collects every candidate observer at every point, and each candidate is scored
on the part of the calibration data that calibration did not use (LM: the rest of calib.txt in
1024-byte windows; Vim: the other 768 calibration images, with their labels). The loss of a candidate
is the relative increase in bits/byte (LM) or the top-1 drop in points (Vim) at W8A8 and W4A8; the
default is the candidate with the smallest mean loss over both samples and both settings.

Then the KLT placement (K from the sum over layers vs the last layer's in_proj input alone) is scored
the same way with the chosen observer.

    python bench/choose_defaults.py --json docs/choose_defaults.json [--lm-windows 24] [--vim-images 768]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmeta import RunMeta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CANDIDATES = {
    "minmax": "minmax",
    "percentile 99.99 (heavy)": "minmax,heavy=percentile:99.99",
    "percentile 99.9999 (heavy; the authors')": "minmax,heavy=percentile:99.9999",
    "mse (heavy)": "minmax,heavy=mse",
    "mse (all)": "mse",
    "mse-out (all)": "mse-out",
    "entropy (heavy)": "minmax,heavy=entropy",
}
SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8)}


def held_out(loaded, calib, lm_windows, vim_images):
    from mq_deploy.quant.compare import calibration_split

    loop, held = calibration_split(loaded, calib)
    if held[0] == "lm":
        held = ("lm", held[1][:lm_windows], held[2][:lm_windows])
    else:
        held = ("vim", held[1][:vim_images], held[2][:vim_images])
    return loop, held


def loss(metric, value, fp):
    return (value / fp - 1) * 100 if metric == "bits_per_byte" else (fp - value) * 100


def run_sample(path, args, specs, klt_source="sum"):
    from mq_deploy.calib.collect import calibrate
    from mq_deploy.calib.spec import ObserverSpec
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.compare import CalibConfig, quantized_copy, score_samples
    from mq_deploy.quant.recipes import Calibrated, RecipeConfig, _consumer_weights, get_recipe, make_observer

    calib = CalibConfig()
    loaded = load_model(path)
    loop, held = held_out(loaded, calib, args.lm_windows, args.vim_images)
    metric, num, den = score_samples(loaded.model, held)
    fp = float(num.sum() / den.sum())
    rcfg = RecipeConfig("mambaquant", klt_source=klt_source)
    get_recipe("mambaquant").transform(loaded.model, loop, rcfg)
    parsed = {k: ObserverSpec.parse(v) for k, v in specs.items()}
    consumers = _consumer_weights(loaded.model)

    def make(name):
        point = name.rsplit(".", 1)[1]
        return [make_observer(name, s.choice_for(point), rcfg.percentile, consumers) for s in parsed.values()]

    t0 = time.time()
    obs = calibrate(loaded.model, loop, make)
    out = {"metric": metric, "fp": fp, "samples": int(len(num)), "calib_seconds": round(time.time() - t0, 1),
           "candidates": {}}
    for j, (label, spec) in enumerate(parsed.items()):
        cal = Calibrated({n: lst[j] for n, lst in obs.items()}, {}, spec)
        res = {}
        for b, (wb, ab) in SETTINGS.items():
            _, num, den = score_samples(quantized_copy(loaded.model, cal, wb, ab), held)
            v = float(num.sum() / den.sum())
            res[b] = {"value": v, "loss": loss(metric, v, fp)}
        out["candidates"][label] = res
        print(f"{os.path.basename(path):20s} {label:42s} " + "  ".join(f"{b} {r['value']:.4f} ({r['loss']:+.3f})"
                                                                      for b, r in res.items()), flush=True)
    return out


def main():
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lm-windows", type=int, default=24)
    p.add_argument("--vim-images", type=int, default=768)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    meta = RunMeta()
    samples = {s: os.path.join(ROOT, "samples", s) for s in ("mamba-byte-lm", "vim-fashion-mnist")}
    report = {"load_before": os.getloadavg(), "observers": {}, "klt": {}}
    for name, path in samples.items():
        report["observers"][name] = run_sample(path, args, CANDIDATES)
    mean = {label: sum(report["observers"][s]["candidates"][label][b]["loss"] for s in samples for b in SETTINGS)
            / (len(samples) * len(SETTINGS)) for label in CANDIDATES}
    chosen = min(mean, key=mean.get)
    report["mean_loss"], report["chosen_observer"] = mean, {"label": chosen, "spec": CANDIDATES[chosen]}
    print(f"chosen observer: {chosen} ({CANDIDATES[chosen]}), mean loss {mean[chosen]:+.3f}")
    for name, path in samples.items():
        report["klt"][name] = {"sum": report["observers"][name]["candidates"][chosen],
                               "last": run_sample(path, args, {chosen: CANDIDATES[chosen]}, "last")["candidates"][chosen]}
    klt_mean = {src: sum(report["klt"][s][src][b]["loss"] for s in samples for b in SETTINGS) / 4
                for src in ("sum", "last")}
    report["klt_mean_loss"] = klt_mean
    report["chosen_klt_source"] = min(klt_mean, key=klt_mean.get)
    report["seconds"], report["load_after"] = round(time.time() - t0, 1), os.getloadavg()
    print(f"KLT placement: {klt_mean} -> {report['chosen_klt_source']}; {report['seconds']} s")
    if args.json:
        from mq_deploy.fileio import write_json

        write_json(args.json, {**report, "run": meta.finish()}, overwrite=True)


if __name__ == "__main__":
    main()
