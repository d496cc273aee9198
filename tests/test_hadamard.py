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
