"""Observers: streaming results equal the one-shot statistics of all data seen."""

import pytest
import torch

from mq_deploy.calib.observers import CovarianceObserver, MinMaxObserver, PercentileObserver
from mq_deploy.errors import MQUserError


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 5, 12)
    # growing range across batches exercises the percentile histogram's re-binning
    return [torch.randn(3, 50, 12, generator=g) * scale * (i + 1) for i in range(5)]


def test_minmax_streaming():
    obs = MinMaxObserver("x")
    bs = batches()
    for b in bs:
        obs.collect(b)
    allx = torch.cat([b.reshape(-1, 12) for b in bs]).double()
    assert torch.equal(obs.amax(per_channel=True), allx.abs().max(0).values)
    assert obs.amax() == allx.abs().max() and obs.count == allx.shape[0]


def test_percentile_streaming_matches_quantile_to_a_bin():
    obs = PercentileObserver("x", percentile=99.0, bins=2048)
    bs = batches()
    for b in bs:
        obs.collect(b)
    a = torch.cat([b.flatten() for b in bs]).abs().double()
    want = torch.quantile(a, 0.99)
    assert abs(float(obs.amax()) - float(want)) <= 2 * obs.range / obs.bins


def test_covariance_streaming_float64():
    obs = CovarianceObserver("x")
    bs = batches()
    for b in bs:
        obs.collect(b)
    allx = torch.cat([b.reshape(-1, 12) for b in bs]).double()
    want = torch.cov(allx.t(), correction=0)
    assert torch.allclose(obs.covariance(), want, rtol=1e-10, atol=1e-10)
    assert torch.allclose(obs.second_moment(), allx.t() @ allx / allx.shape[0], rtol=1e-12)


@pytest.mark.parametrize("cls", [MinMaxObserver, PercentileObserver, CovarianceObserver])
def test_nan_names_the_quant_point(cls):
    obs = cls("layers.3.mixer.x_proj:in")
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(MQUserError, match="NaN.*layers.3.mixer.x_proj:in"):
        obs.collect(x)
    x[1, 2] = float("inf")
    with pytest.raises(MQUserError, match="Inf"):
        obs.collect(x)
