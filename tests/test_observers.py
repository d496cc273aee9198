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


# -- observer spec (--observer) ------------------------------------------------------------------

from mq_deploy.calib.observers import EntropyObserver, MSEObserver, OutputMSEObserver  # noqa: E402
from mq_deploy.calib.spec import PERCENTILE_DEFAULT, ObserverSpec  # noqa: E402


def test_spec_default_overrides_and_precedence():
    spec = ObserverSpec.parse("minmax,heavy=percentile:99.999,x=mse,x_b=entropy,out_proj=mse-out")
    kinds = {p: str(spec.choice_for(p)) for p in ("in_proj", "dt", "dt_b", "x", "x_b", "out_proj", "z")}
    assert kinds == {"in_proj": "minmax", "dt": "percentile:99.999", "dt_b": "percentile:99.999", "x": "mse",
                     "x_b": "entropy", "out_proj": "mse-out", "z": "minmax"}
    assert ObserverSpec.parse("entropy").choice_for("B_b").kind == "entropy"
    assert str(ObserverSpec.parse(" mse , dt = minmax ")) == "mse,dt=minmax"
    assert PERCENTILE_DEFAULT == 99.9999    # MambaQuant's own default (quantize/quantizer.py)


@pytest.mark.parametrize("text,needle", [("kl", "unknown observer 'kl'"), ("minmax,foo=mse", "unknown quant point"),
                                         ("mse:3", "takes no parameter"), ("percentile:80", "[90, 100]"),
                                         ("percentile:abc", "not a number"), ("", "empty spec")])
def test_spec_errors_are_one_line_user_errors(text, needle):
    with pytest.raises(MQUserError, match="--observer") as e:
        ObserverSpec.parse(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def heavy_tailed(seed=0, n=40000, c=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[torch.randint(0, n, (n // 1000,), generator=g), 3] *= 25     # a few outliers in one channel
    return x


def direct_mse(x, amax, bits):
    q = 2 ** (bits - 1) - 1
    s = amax / q
    return float(((torch.clamp(torch.round(x / s), -q - 1, q) * s - x) ** 2).mean())


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_mse_observer_minimises_the_tensor_mse(bits):
    x = heavy_tailed(n=8000)
    obs = MSEObserver("x")
    for part in x.split(2000):
        obs.collect(part)
    a = float(obs.amax(bits))
    amax = float(x.abs().max())
    brute = min(direct_mse(x, amax * k / 200, bits) for k in range(1, 201))
    got, at_max = direct_mse(x, a, bits), direct_mse(x, amax, bits)
    print(f"bits {bits}: chosen {a:.3f} of max {amax:.3f}; mse {got:.3e}, brute-force best {brute:.3e}, "
          f"min-max {at_max:.3e}")
    # the histogram (4096 bins, bin centres) and a 200-point grid: within 3 % of a 200-point brute-force search
    assert a < amax and got <= brute * 1.03 and got < at_max


def entropy_reference(hist, bits, start_bin):
    """NVIDIA ModelOpt's _compute_amax_entropy, loop for loop (without scipy), as the reference."""
    import numpy as np

    bins = hist.copy()
    bins[0] = bins[1]
    nbins = 1 << (bits - 1)
    divergences, arguments = [], []
    for i in range(start_bin, len(bins) + 1):
        new_density_counts = np.zeros(nbins)
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        for idx, d in enumerate(digitized):
            if d != -1:
                new_density_counts[d] += bins[idx]
        counts = {k: int((digitized == k).sum()) for k in set(digitized.tolist()) if k != -1}
        for k, v in counts.items():
            new_density_counts[k] /= v
        new_density = np.array([new_density_counts[d] if d != -1 else 0.0 for d in digitized])
        ref = bins[:i].copy()
        ref[-1] += bins[i:].sum()
        p, q = ref / ref.sum(), new_density / new_density.sum()
        m = p > 0
        kl = np.inf if np.any(q[m] == 0) else float(np.sum(p[m] * np.log(p[m] / q[m])))
        divergences.append(kl)
        arguments.append(i)
    d = np.array(divergences)
    return arguments[len(d) - 1 - int(np.argmin(d[::-1]))]


@pytest.mark.parametrize("bits", [8, 4])
def test_entropy_observer_matches_modelopt_algorithm(bits):
    obs = EntropyObserver("x", bins=256, start_bin=32)
    obs.collect(heavy_tailed(1, n=5000, c=8))
    want_bin = entropy_reference(obs.hist.numpy(), bits, 32)
    got = float(obs.amax(bits))
    print(f"bits {bits}: threshold bin {want_bin}, amax {got:.4f}, max {obs.max:.4f}")
    assert got == pytest.approx(min(want_bin * obs.range / obs.bins, obs.max), rel=1e-12)
    assert got < obs.max


@pytest.mark.parametrize("out_features", [40, 8])      # out > in: the Gram path; out < in: E W^T directly
def test_output_mse_loss_is_the_consumer_output_error(out_features):
    x = heavy_tailed(2, n=3000, c=16)
    W = torch.randn(out_features, 16)
    obs = OutputMSEObserver("x", W, rows=4096)
    obs.collect(x)
    assert obs.sample.shape == (3000, 16)            # fewer rows than the reservoir: all kept
    for a in (1.0, 3.0):
        q = 7
        s = a / q
        e = torch.clamp(torch.round(x / s), -q - 1, q) * s - x
        want = float(((e @ W.t()) ** 2).sum())
        assert obs.loss(a, 4) == pytest.approx(want, rel=1e-4)
    # a consumer that reads only the outlier channel wants less clipping than one that ignores it
    only3, not3 = torch.zeros(4, 16), torch.ones(4, 16)
    only3[:, 3], not3[:, 3] = 1.0, 0.0
    a_only, a_not = (OutputMSEObserver("x", w, rows=4096) for w in (only3, not3))
    a_only.collect(x)
    a_not.collect(x)
    assert float(a_only.amax(6)) > float(a_not.amax(6))


def test_output_mse_reservoir_is_bounded_and_seeded():
    W = torch.randn(8, 16)
    a, b = OutputMSEObserver("x", W, rows=100), OutputMSEObserver("x", W, rows=100)
    for part in heavy_tailed(3).split(7000):
        a.collect(part)
        b.collect(part)
    assert a.sample.shape == (100, 16) and torch.equal(a.sample, b.sample) and a.count == 40000
    assert float(a.amax(8)) == float(b.amax(8))


def test_percentile_default_and_100_is_minmax():
    x = heavy_tailed()
    p, p100, mm = PercentileObserver("x"), PercentileObserver("x", 100.0), MinMaxObserver("x")
    for o in (p, p100, mm):
        o.collect(x)
    assert p.percentile == 99.9999
    assert float(p100.amax()) == float(mm.amax()) and float(p.amax()) <= float(mm.amax())
