"""Calibration observers: collect / reset / compute, kept apart from where the data comes from.

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

    def amax(self, per_channel: bool = False) -> torch.Tensor:
        if self.max is None:
            raise MQUserError(f"calibration: quant point {self.name} saw no data")
        a = torch.maximum(self.max.abs(), self.min.abs())
        return a if per_channel else a.max()


class PercentileObserver(Observer):
    """Per-tensor |x| percentile, estimated from a fixed-size histogram that grows its range by
    doubling (so memory stays constant however many samples arrive)."""

    def __init__(self, name="", percentile: float = 99.99, bins: int = 4096):
        super().__init__(name)
        if not 0 < percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        self.percentile, self.bins = percentile, bins
        self.reset()

    def reset(self):
        super().reset()
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.range = 0.0

    def collect(self, x):
        a = self._rows(x).abs().to(torch.float64).flatten()
        hi = float(a.max()) if a.numel() else 0.0
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

    def amax(self) -> torch.Tensor:
        if self.count == 0:
            raise MQUserError(f"calibration: quant point {self.name} saw no data")
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        return torch.tensor((min(idx, self.bins - 1) + 1) * self.range / self.bins, dtype=torch.float64)


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
