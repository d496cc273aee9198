"""`mq-deploy inspect`: per-channel statistics at the matmul inputs, raw and under each rotation.

For the inputs of in_proj, x_proj (the scan's x) and out_proj of every layer it shows per-channel
max |x| and variance for four views of the same calibration activations:

  raw            X
  hadamard       X H                        (QuaRot)
  klt_hadamard   X K H, K the KLT basis of this input's second moment (MambaQuant)
  smooth_rotate  (X / s) K H, s = max|X|^a / max|W|^(1-a) against the consuming weight (Smooth-Fused)

and a summary table: kurtosis of the values, max/median of the per-channel max |x|, and
max/median of the per-channel variance. Flat channels (ratios near 1, kurtosis near 3 or below)
quantize well per tensor; a large max/median ratio is what breaks RTN.
"""

from __future__ import annotations

import json
import os

import torch

from mq_deploy.calib.collect import calibrate, mixers
from mq_deploy.calib.observers import CovarianceObserver, MinMaxObserver, Observer
from mq_deploy.models.io import atomic_write_dir
from mq_deploy.ops.hadamard import has_hadamard
from mq_deploy.transforms.rotations import hadamard_rotation, klt_basis, smoothing_factors


class RowSampleObserver(Observer):
    """Keeps at most `limit` rows, an evenly strided subsample of every batch (memory stays bounded)."""

    def __init__(self, name="", limit: int = 4096, per_batch: int = 512):
        super().__init__(name)
        self.limit, self.per_batch = limit, per_batch
        self.rows = []

    def collect(self, x):
        r = self._rows(x).to(torch.float64)
        step = max(1, r.shape[0] // self.per_batch)
        if sum(len(t) for t in self.rows) < self.limit:
            self.rows.append(r[::step][: self.per_batch])
        self.count += r.shape[0]

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)[: self.limit]


def _kurtosis(v: torch.Tensor) -> float:
    v = v.flatten()
    c = v - v.mean()
    return float((c.pow(4).mean() / c.pow(2).mean().clamp_min(1e-30).pow(2)))


def _ratio(v: torch.Tensor) -> float:
    return float(v.max() / v.median().clamp_min(1e-30))


def views(X: torch.Tensor, second_moment: torch.Tensor, w_amax: torch.Tensor, x_amax: torch.Tensor, alpha: float):
    n = X.shape[1]
    out = {"raw": X}
    if has_hadamard(n):
        H = hadamard_rotation(n)
        KH = klt_basis(second_moment) @ H
        s = smoothing_factors(x_amax, w_amax, alpha)
        out.update({"hadamard": X @ H, "klt_hadamard": X @ KH, "smooth_rotate": (X / s) @ KH})
    return out


def inspect_model(model, loop, alpha: float = 0.5):
    """Return {"rows": [...], "channels": {point: {view: (max per channel, var per channel)}}}."""
    plotted = {prefix: dict(mixer.family.inspect) for prefix, mixer in mixers(model)}   # point -> consuming linear

    def make(name):
        prefix, _, point = name.rpartition(".")
        if point not in plotted[prefix + "."]:
            return []
        return [RowSampleObserver(name), CovarianceObserver(name), MinMaxObserver(name)]

    obs = calibrate(model, loop, make)
    rows, channels = [], {}
    for prefix, mixer in mixers(model):
        for point, consumer in plotted[prefix].items():
            name = prefix + point
            sample, cov, mm = obs[name]
            w_amax = getattr(mixer, consumer).weight.detach().double().abs().amax(0)
            channels[name] = {}
            for view, X in views(sample.sample(), cov.second_moment(), w_amax, mm.amax(per_channel=True),
                                 alpha).items():
                ch_max, ch_var = X.abs().amax(0), X.var(0, correction=0)
                channels[name][view] = (ch_max, ch_var)
                rows.append({"point": name, "view": view, "kurtosis": _kurtosis(X),
                             "max_median_channel_max": _ratio(ch_max), "max_median_channel_var": _ratio(ch_var)})
    return {"rows": rows, "channels": channels}


def _plot(path, name, per_view):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(per_view), figsize=(4 * len(per_view), 5.5), squeeze=False)
    for j, (view, (ch_max, ch_var)) in enumerate(per_view.items()):
        for i, (vals, label) in enumerate(((ch_max, "max |x|"), (ch_var, "variance"))):
            ax = axes[i][j]
            ax.bar(range(len(vals)), vals.numpy(), width=1.0, color="tab:blue" if i == 0 else "tab:orange")
            ax.set_title(f"{view}: {label}\nmax/median {_ratio(vals):.1f}", fontsize=9)
            ax.set_xlabel("channel", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(name, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _table(rows) -> str:
    lines = ["| point | view | kurtosis | max/median channel max | max/median channel variance |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['point']} | {r['view']} | {r['kurtosis']:.2f} | {r['max_median_channel_max']:.2f} | "
                     f"{r['max_median_channel_var']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: str, title: str, overwrite: bool = False, inputs=()) -> str:
    def write(tmp):
        for name, per_view in result["channels"].items():
            _plot(os.path.join(tmp, name.replace(".", "_") + ".png"), name, per_view)
        with open(os.path.join(tmp, "summary.md"), "w") as f:
            f.write(f"# {title}\n\n" + _table(result["rows"]))
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump({"rows": result["rows"]}, f, indent=2)
            f.write("\n")

    return atomic_write_dir(out_dir, write, overwrite=overwrite, inputs=inputs, kind="inspect report")


def inspect_to_dir(model_path: str, out_dir: str, *, recipe: str | None = None, alpha: float = 0.5,
                   calib: str | None = None, calib_samples: int | None = None, overwrite: bool = False,
                   tokenizer: str | None = None, calib_seq_len: int = 512) -> dict:
    """`mq-deploy inspect`: channel statistics (optionally after a recipe's transforms) -> a report folder."""
    from mq_deploy import fileio
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.compare import CalibConfig, calibration_loop
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

    inputs = [model_path, calib, tokenizer]
    fileio.check_target(out_dir, overwrite, inputs, "report folder", folder=True)
    loaded = load_model(model_path)
    loop = calibration_loop(loaded, CalibConfig(path=calib, samples=calib_samples, tokenizer=tokenizer,
                                                seq_len=calib_seq_len))
    inputs.append(loop.source)
    title = f"{model_path}: activation channels at the matmul inputs"
    if recipe:
        apply_recipe(loaded.model, loop, RecipeConfig(recipe, alpha=alpha), quantize=False)
        title += f" after the {recipe} transforms"
    result = inspect_model(loaded.model, loop, alpha=alpha)
    result["path"] = write_report(result, out_dir, title, overwrite=overwrite, inputs=[i for i in inputs if i])
    return result
