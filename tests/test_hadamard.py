"""Hadamard construction: orthogonal, +-1 entries, right sizes, and a clear error where none exists."""

import numpy as np
import pytest

from mq_deploy.errors import MQUserError
from mq_deploy.ops.hadamard import hadamard_matrix, has_hadamard, known_orders


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 40, 192, 384, 768, 1536, 640])
def test_orthogonal_pm1(n):
    h = hadamard_matrix(n, normalized=False)
    assert set(np.unique(h)) <= {-1.0, 1.0}
    assert np.array_equal(h @ h.T, n * np.eye(n))   # float64 products of +-1 are exact here
    hn = hadamard_matrix(n)
    assert np.abs(hn @ hn.T - np.eye(n)).max() < 1e-12


def test_required_small_orders_known():
    assert {1, 12, 20, 28} <= set(known_orders())


@pytest.mark.parametrize("n", [3, 6, 10, 14, 0, 92])  # 92 exists (Williamson), not by Paley/Sylvester
def test_no_silent_substitute(n):
    assert not has_hadamard(n)
    with pytest.raises(MQUserError, match=f"no Hadamard matrix of size {n}"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n,dtype", [(1536, "float32"), (384, "float64"), (8192, "float32"), (40, "float32"),
                                     (48, "bfloat16")])
def test_rotate_equals_the_dense_product(n, dtype):
    """ops.hadamard.rotate (P^T X Q on [.., a, n / a]) against rotate_ref (x @ R) on rows reaching the edges (zeros,
    1e30-sized and tiny rows, 3-d input): within float rounding of the dtype (a bfloat16 R is not the Hadamard to
    float tolerance, so it stays the dense product: equal)."""
    import torch

    from mq_deploy.ops.hadamard import hadamard_factors, rotate, rotate_ref

    dt = getattr(torch, dtype)
    R = torch.from_numpy(hadamard_matrix(n)).to(dt)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 4, n, generator=g, dtype=torch.float64)
    x[0, 0] = 0
    x[0, 1] *= 1e30
    x[0, 2] *= 1e-30
    x[1, 0] = -x[1, 0].abs()
    x = x.to(dt)
    got, want = rotate(x, R), rotate_ref(x, R)
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == "bfloat16":
        assert hadamard_factors(R) is None and torch.equal(got, want)
        return
    assert hadamard_factors(R) is not None
    tol = {"float32": 1e-6, "float64": 1e-13}[dtype]
    got64, want64 = got.double(), want.double()
    rel = ((got64 - want64).abs().amax(-1) / want64.abs().amax(-1).clamp_min(1e-300)).max().item()
    print(f"n {n} {dtype}: worst row error / row max {rel:.2e}")
    assert rel <= tol and (got[0, 0] == 0).all()
    ref64 = x.double() @ torch.from_numpy(hadamard_matrix(n))     # against float64, no worse than the dense product
    e = lambda y: ((y.double() - ref64).abs().amax(-1) / ref64.abs().amax(-1).clamp_min(1e-300)).max().item()
    assert e(got) <= 4 * e(want) + tol


def test_rotate_keeps_other_matrices_dense():
    """Anything but the normalised Hadamard of its size (an orthogonal matrix, the negated Hadamard, one entry off,
    a NaN) is the dense product, checked once per tensor and again after an in-place change."""
    import torch

    from mq_deploy.ops.hadamard import hadamard_factors, rotate

    x = torch.randn(5, 64, dtype=torch.float64)
    H = torch.from_numpy(hadamard_matrix(64))
    off = H.clone()
    off[17, 3] += 1e-4
    nan = H.clone()
    nan[0, 0] = float("nan")
    for R in (torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0], -H, off, nan):
        assert hadamard_factors(R) is None
        torch.testing.assert_close(rotate(x, R), x @ R, rtol=0, atol=0, equal_nan=True)
    R = H.clone()                      # a Hadamard changed in place after its first use is checked again
    rotate(x, R)
    R.mul_(-1)
    torch.testing.assert_close(rotate(x, R), x @ R, rtol=0, atol=0)
