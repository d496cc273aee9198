"""Calibration observers: collect / reset / compute, kept apart from where the data comes from.

Every observer with a clipping threshold has `amax(bits)`: min-max and percentile ignore the bit
width; mse, mse-out and entropy choose the threshold for that many bits, so one calibration pass
serves every activation bit width.

Each observer sees activations shaped [..., C] (channels last) and keeps O(C) or O(C^2) state, so
memory does not grow with the number of calibration samples. A NaN or Inf is an error that names
the quant point, never a silently skewed scale.
"""

from __future__ import annotations

import torch

from mq_deploy.errors import MQUserError


class Observer:
    def __init__(self, name: str = ""):
        self.name = name
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "Inf"
            raise MQUserError(f"calibration: {bad} in the activation at quant point {self.name or '?'} "
                              "(check the calibration data and the model weights)")
        return x.reshape(-1, x.shape[-1])

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Per-channel min and max (per-tensor values are their min/max)."""

    def reset(self):
        super().reset()
        self.min = self.max = None

    def __init__(self, name=""):
        super().__init__(name)
        self.reset()

    def collect(self, x):
        r = self._rows(x).to(torch.float64)
        lo, hi = r.min(0).values, r.max(0).values
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.count += r.shape[0]

    def amax(self, bits: int = 8, per_channel: bool = False) -> torch.Tensor:
        """max |x| (per channel, or of the tensor); `bits` is unused (every observer takes it)."""
        if self.max is None:
            raise MQUserError(f"calibration: quant point {self.name} saw no data")
        a = torch.maximum(self.max.abs(), self.min.abs())
        return a if per_channel else a.max()


class HistogramObserver(Observer):
    """Histogram of |x| over [0, range] with a fixed number of bins; the range grows by doubling (the
    old bins merge exactly), so memory stays constant however many samples arrive. Subclasses pick
    the clipping threshold from it."""

    def __init__(self, name="", bins: int = 4096):
        super().__init__(name)
        self.bins = bins
        self.reset()

    def reset(self):
        super().reset()
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.range = 0.0
        self.max = 0.0

    def collect(self, x):
        a = self._rows(x).abs().to(torch.float64).flatten()
        hi = float(a.max()) if a.numel() else 0.0
        self.max = max(self.max, hi)
        if hi > self.range:
            new_range = max(hi, 1e-12) if self.range == 0 else self.range
            while new_range < hi:
                new_range *= 2
            if self.range > 0:  # re-bin the old histogram into the wider range (factor is a power of two)
                factor = int(round(new_range / self.range))
                old = self.hist
                self.hist = torch.zeros(self.bins, dtype=torch.float64)
                self.hist.index_add_(0, torch.arange(self.bins) // factor, old)
            self.range = new_range
        if self.range > 0:
            self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.range)
        self.count += a.numel()

    def _check(self):
        if self.count == 0:
            raise MQUserError(f"calibration: quant point {self.name} saw no data")

    def edges(self) -> torch.Tensor:
        return torch.arange(self.bins + 1, dtype=torch.float64) * (self.range / self.bins)


class PercentileObserver(HistogramObserver):
    """Per-tensor |x| percentile (to one histogram bin). MambaQuant's default is 99.9999
    (`mq_deploy.calib.spec.PERCENTILE_DEFAULT`, from MambaQuant/MambaQuant quantize/quantizer.py)."""

    def __init__(self, name="", percentile: float = 99.9999, bins: int = 4096):
        if not 0 < percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        self.percentile = percentile
        super().__init__(name, bins)

    def amax(self, bits: int = 8) -> torch.Tensor:
        self._check()
        if self.percentile >= 100:
            return torch.tensor(self.max, dtype=torch.float64)
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        return torch.tensor(min((min(idx, self.bins - 1) + 1) * self.range / self.bins, self.max),
                            dtype=torch.float64)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


class MSEObserver(HistogramObserver):
    """The clip threshold that minimises the expected squared quantization error of the tensor itself,
    computed from the |x| histogram (bin centres) over a grid of clip ratios of the observed max."""

    def __init__(self, name="", bins: int = 4096, grid: int = 200):
        self.grid = grid
        super().__init__(name, bins)

    def mse_curve(self, bits: int):
        """(candidate amax [K], expected squared error per value [K])."""
        self._check()
        q = _qmax(bits)
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.range / self.bins)
        keep = self.hist > 0
        c, n = centres[keep], self.hist[keep]
        cand = self.max * torch.arange(1, self.grid + 1, dtype=torch.float64) / self.grid
        s = (cand / q)[:, None]
        err = (c[None] - torch.clamp(torch.round(c[None] / s), -q - 1, q) * s) ** 2
        return cand, (err * n[None]).sum(1) / n.sum()

    def amax(self, bits: int = 8) -> torch.Tensor:
        cand, err = self.mse_curve(bits)
        return cand[int(torch.argmin(err))]


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy (KL-divergence) calibrator, as NVIDIA ModelOpt's `_compute_amax_entropy`
    implements it: 2048 bins of |x|; for every threshold bin i >= 128 the reference distribution
    (bins below i, outliers added to the last one) is compared with its 2^(b-1)-level quantized
    version (each level spreads its mass evenly over its non-empty bins); the threshold with the
    smallest KL divergence wins (the last one among ties)."""

    def __init__(self, name="", bins: int = 2048, start_bin: int = 128):
        self.start_bin = start_bin
        super().__init__(name, bins)

    def amax(self, bits: int = 8) -> torch.Tensor:
        import numpy as np

        self._check()
        hist = self.hist.numpy().copy()
        hist[0] = hist[1]           # as ModelOpt: the zero bin (padding, ReLU zeros) would dominate
        nlev = 1 << (bits - 1)
        best_i, best_kl = self.bins, np.inf
        tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])    # tail[i] = sum(hist[i:])
        for i in range(min(self.start_bin, self.bins), self.bins + 1):
            p = hist[:i].copy()
            p[-1] += tail[i]
            level = (np.arange(i) * nlev) // i
            nonzero = hist[:i] > 0
            mass = np.bincount(level, weights=hist[:i], minlength=nlev)
            occupied = np.bincount(level, weights=nonzero.astype(np.float64), minlength=nlev)
            qd = np.where(nonzero, mass[level] / np.maximum(occupied[level], 1), 0.0)
            if qd.sum() <= 0 or p.sum() <= 0:
                continue
            p, qd = p / p.sum(), qd / qd.sum()
            m = p > 0
            with np.errstate(divide="ignore"):
                kl = float(np.sum(p[m] * (np.log(p[m]) - np.log(qd[m])))) if np.all(qd[m] > 0) else np.inf
            if kl <= best_kl:
                best_i, best_kl = i, kl
        return torch.tensor(min(best_i * self.range / self.bins, self.max) if best_kl < np.inf else self.max,
                            dtype=torch.float64)


class OutputMSEObserver(Observer):
    """The clip threshold that minimises the squared error of the consumer's output, as ModelOpt's MSE
    calibrator and OmniQuant-style searches do: E ||(Q(x) - x) W^T||^2 for a linear consumer with
    weight W [out, in], or sum_d ||w_d||^2 E (Q(x_d) - x_d)^2 for a depthwise conv (weight [Di, 1, K]).

    The expectation is estimated on a uniform sample of `rows` activation rows (a seeded reservoir:
    each row gets a random key, the smallest keys stay), the search range on the observed max of all
    rows. The search is a grid of clip ratios refined once around the best.
    """

    def __init__(self, name="", consumer: torch.Tensor | None = None, rows: int = 512, seed: int = 0):
        super().__init__(name)
        if consumer is None:
            raise ValueError("OutputMSEObserver needs the consumer's weight")
        w = consumer.detach().to(torch.float64)
        if w.dim() == 3:                               # depthwise conv: a per-channel weight
            self._diag, self._proj, self._is_gram = w.reshape(w.shape[0], -1).pow(2).sum(1).float(), None, False
        else:                                          # E W^T, or E G with G = W^T W when out > in
            self._diag, self._is_gram = None, w.shape[0] > w.shape[1]
            self._proj = (w.t() @ w if self._is_gram else w.t()).float()
        self.rows, self.gen = rows, torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self):
        super().reset()
        self.sample = self.keys = None
        self.max = 0.0

    def collect(self, x):
        r = self._rows(x).float()
        self.max = max(self.max, float(r.abs().max()) if r.numel() else 0.0)
        keys = torch.rand(r.shape[0], generator=self.gen)
        if self.sample is not None:
            r, keys = torch.cat([self.sample, r]), torch.cat([self.keys, keys])
        if r.shape[0] > self.rows:
            idx = torch.topk(keys, self.rows, largest=False).indices
            r, keys = r[idx], keys[idx]
        self.sample, self.keys = r, keys
        self.count += x.numel() // x.shape[-1]

    def loss(self, amax: float, bits: int) -> float:
        s = torch.tensor(max(amax, 1e-12) / _qmax(bits))
        q = _qmax(bits)
        e = torch.clamp(torch.round(self.sample / s), -q - 1, q) * s - self.sample
        if self._diag is not None:
            return float((e.pow(2) * self._diag).sum())
        p = e @ self._proj
        return float((p * e).sum() if self._is_gram else p.pow(2).sum())

    def amax(self, bits: int = 8) -> torch.Tensor:
        if self.sample is None:
            raise MQUserError(f"calibration: quant point {self.name} saw no data")
        grid = [self.max * k / 24 for k in range(1, 25)]
        best = min(grid, key=lambda a: self.loss(a, bits))
        step = self.max / 24
        fine = [best + step * (k / 8) for k in range(-8, 9) if 0 < best + step * (k / 8) <= self.max]
        return torch.tensor(min(fine + [best], key=lambda a: self.loss(a, bits)), dtype=torch.float64)


class CovarianceObserver(Observer):
    """Streaming mean and covariance of the channels, accumulated in float64 (sum and sum of outer products)."""

    def __init__(self, name=""):
        super().__init__(name)
        self.reset()

    def reset(self):
        super().reset()
        self.sum = self.outer = None

    def collect(self, x):
        r = self._rows(x).to(torch.float64)
        if self.sum is None:
            c = r.shape[1]
            self.sum = torch.zeros(c, dtype=torch.float64)
            self.outer = torch.zeros(c, c, dtype=torch.float64)
        self.sum += r.sum(0)
        self.outer += r.t() @ r
        self.count += r.shape[0]

    def mean(self) -> torch.Tensor:
        if not self.count:
            raise MQUserError(f"calibration: quant point {self.name} saw no data")
        return self.sum / self.count

    def second_moment(self) -> torch.Tensor:
        """E[x x^T]: what a rotation of un-centred activations diagonalises."""
        return self.outer / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        return self.outer / self.count - torch.outer(mu, mu)


class GroupedObserver(Observer):
    """One observer per group of consecutive channels (the last axis split into `groups` equal parts):
    `amax(bits)` is a vector [groups]. Per-head / per-SSD-group activation scales (QuantConfig.ssm_scales)."""

    def __init__(self, name: str, groups: int, make):
        super().__init__(name)
        self.groups = groups
        self.parts = [make(f"{name}[{g}]") for g in range(groups)]

    def collect(self, x):
        if x.shape[-1] % self.groups:
            raise MQUserError(f"calibration: quant point {self.name} has {x.shape[-1]} channels, not a multiple "
                              f"of its {self.groups} scale groups")
        for part, xs in zip(self.parts, x.chunk(self.groups, dim=-1)):
            part.collect(xs)
        self.count = self.parts[0].count

    def amax(self, bits: int = 8) -> torch.Tensor:
        return torch.stack([torch.as_tensor(p.amax(bits), dtype=torch.float64).reshape(()) for p in self.parts])

