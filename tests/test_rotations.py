"""KLT-enhanced rotation: orthogonal, and it equalises channel variances exactly (H^T Λ H has a
constant diagonal)."""

import torch

from mq_deploy.transforms.rotations import klt_basis, klt_hadamard_rotation, smoothing_factors


def correlated(n=24, rows=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scale = torch.logspace(-1, 1.5, n, dtype=torch.float64)
    return (torch.randn(rows, n, generator=g, dtype=torch.float64) * scale) @ mix


def test_klt_h_is_orthogonal_and_equalises_variance():
    x = correlated()
    x = x - x.mean(0)
    cov = x.t() @ x / x.shape[0]
    R = klt_hadamard_rotation(cov)
    assert torch.allclose(R.t() @ R, torch.eye(24, dtype=torch.float64), atol=1e-12)
    var_before = x.var(0, correction=0)
    var_after = (x @ R).var(0, correction=0)
    print(f"max/min channel variance: before {var_before.max() / var_before.min():.1f}, "
          f"after {var_after.max() / var_after.min():.6f}")
    assert var_before.max() / var_before.min() > 10
    assert torch.allclose(var_after, torch.full_like(var_after, var_before.sum() / 24), rtol=1e-9)


def test_klt_basis_decorrelates_and_is_sorted():
    x = correlated(12)
    cov = torch.cov(x.t(), correction=0)
    K = klt_basis(cov)
    d = K.t() @ cov @ K
    off = d - torch.diag(torch.diag(d))
    assert off.abs().max() < 1e-9 * d.abs().max()
    assert torch.all(torch.diag(d)[:-1] >= torch.diag(d)[1:])


def test_smoothing_factors_balance_ranges():
    a = torch.tensor([100.0, 1.0, 0.01])
    w = torch.tensor([0.5, 0.5, 2.0])
    s = smoothing_factors(a, w, alpha=0.5)
    # after x / s and W * s both sides have the same per-channel range: sqrt(max|X| max|W|)
    assert torch.allclose(a / s, w * s, rtol=1e-12)
