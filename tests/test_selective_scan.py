"""Fast CPU selective scan vs the plain reference (same signature).

Tolerances: in float64 both paths compute the same sums in a different order, so they agree to
~1e-13 relative; we assert 1e-10. In float32 the fast path uses exp2 and a matmul readout; rounding
over L steps of a contracting recurrence stays below ~1e-5 relative, asserted at 2e-5.
"""

import pytest
import torch

from mq_deploy.ops import selective_scan as ss
from mq_deploy.ops.selective_scan import selective_scan, selective_scan_ref, selective_state_update

from conftest import rel_err


def make_inputs(b, L, D, N, dtype, with_z=True, with_state=False, requires_grad=False):
    g = dict(dtype=dtype, requires_grad=requires_grad)
    x = torch.randn(b, L, D, **g)
    delta = (torch.randn(b, L, D, dtype=dtype) * 0.5).requires_grad_(requires_grad)
    A = (-torch.rand(D, N, dtype=dtype) * 3 - 0.1).requires_grad_(requires_grad)
    B = torch.randn(b, L, N, **g)
    C = torch.randn(b, L, N, **g)
    Dv = torch.randn(D, **g)
    z = torch.randn(b, L, D, **g) if with_z else None
    bias = (torch.randn(D, dtype=dtype) * 0.3).requires_grad_(requires_grad)
    h0 = torch.randn(b, D, N, **g) if with_state else None
    return x, delta, A, B, C, Dv, z, bias, h0


SHAPES = [(1, 1, 8, 16), (2, 17, 24, 16), (3, 40, 7, 64), (2, 129, 33, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_fast_matches_reference(shape, with_z, with_state, dtype, tol):
    x, delta, A, B, C, Dv, z, bias, h0 = make_inputs(*shape, dtype, with_z, with_state)
    y_ref, h_ref = selective_scan_ref(x, delta, A, B, C, Dv, z, bias, True, h0, return_last_state=True)
    y, h = selective_scan(x, delta, A, B, C, Dv, z, bias, True, h0, return_last_state=True)
    ey, eh = rel_err(y, y_ref), rel_err(h, h_ref)
    print(f"{shape} {dtype}: y rel err {ey:.2e}, state rel err {eh:.2e}")
    assert ey < tol and eh < tol


def test_chunk_boundaries(monkeypatch):
    """The no-grad path carries the state across time chunks; force tiny chunks (L not a multiple)."""
    monkeypatch.setattr(ss, "_CHUNK_BYTES", 3 * 2 * 16 * 24 * 8)   # 3 steps a chunk at b=2, N=16, D=24
    x, delta, A, B, C, Dv, z, bias, h0 = make_inputs(2, 23, 24, 16, torch.float64, True, True)
    y_ref, h_ref = selective_scan_ref(x, delta, A, B, C, Dv, z, bias, True, h0, return_last_state=True)
    with torch.no_grad():
        y, h = selective_scan(x, delta, A, B, C, Dv, z, bias, True, h0, return_last_state=True)
    assert rel_err(y, y_ref) < 1e-10 and rel_err(h, h_ref) < 1e-10


def test_no_softplus_no_bias():
    x, delta, A, B, C, Dv, z, bias, h0 = make_inputs(2, 9, 8, 16, torch.float64)
    delta = delta.abs()
    y_ref = selective_scan_ref(x, delta, A, B, C, None, None, None, False)
    y = selective_scan(x, delta, A, B, C, None, None, None, False)
    assert rel_err(y, y_ref) < 1e-10


def test_gradients_match_autograd_of_reference():
    """The hand-written backward equals autograd through the reference loop (float64)."""
    inputs = make_inputs(2, 11, 6, 5, torch.float64, True, True, requires_grad=True)
    names = ["x", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    gy = torch.randn(2, 11, 6, dtype=torch.float64)
    gh = torch.randn(2, 6, 5, dtype=torch.float64)
    grads = []
    for fn in (selective_scan_ref, selective_scan):
        y, h = fn(*inputs[:8], True, inputs[8], return_last_state=True)
        grads.append(torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs))
    for name, g_ref, g in zip(names, *grads):
        e = rel_err(g, g_ref)
        print(f"grad {name}: rel err {e:.2e}")
        assert e < 1e-10, name


def test_gradcheck_core():
    inputs = make_inputs(1, 5, 3, 4, torch.float64, True, True, requires_grad=True)
    f = lambda *a: selective_scan(*a[:8], True, a[8], return_last_state=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs)


def test_state_update_is_one_reference_step():
    x, delta, A, B, C, Dv, z, bias, h0 = make_inputs(3, 1, 10, 16, torch.float64, True, True)
    y_ref, h_ref = selective_scan_ref(x, delta, A, B, C, Dv, z, bias, True, h0, return_last_state=True)
    y, h = selective_state_update(h0, x[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], Dv, z[:, 0], bias)
    assert rel_err(y, y_ref[:, 0]) < 1e-12 and rel_err(h, h_ref) < 1e-12


def test_shape_errors():
    x, delta, A, B, C, Dv, z, bias, h0 = make_inputs(2, 5, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(x, delta, A, B[:, :3], C)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_ref(x, delta, A[:4], B, C)
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(x, delta, A, B, C, initial_state=torch.zeros(2, 8, 5))
