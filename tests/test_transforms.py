"""Every offline fold preserves the model's outputs: random model in float64, transform, compare at 1e-10."""

import torch

from mq_deploy.families.mamba1 import folds as m1_folds
from mq_deploy.ops.hadamard import hadamard_matrix
from mq_deploy.transforms import fold

from conftest import rel_err
from helpers import small_lm, small_vim


def random_orthogonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def lm_and_input():
    m = small_lm(d_model=24, d_model2=24, bias=True).double()
    with torch.no_grad():  # norms away from 1 so that fusing them matters
        for layer in m.layers:
            layer.norm.weight.mul_(1 + 0.3 * torch.randn_like(layer.norm.weight))
        m.norm_f.weight.mul_(1 + 0.3 * torch.randn_like(m.norm_f.weight))
    return m, torch.randint(0, 50, (2, 15))


def vim_and_input():
    m = small_vim(d_model=24).double()
    with torch.no_grad():
        for layer in m.layers:
            layer.norm.weight.mul_(1 + 0.3 * torch.randn_like(layer.norm.weight))
    return m, torch.randn(2, 1, 12, 12, dtype=torch.float64)


def test_fuse_norms_lm():
    m, ids = lm_and_input()
    with torch.no_grad():
        want = m(ids)
        fold.fuse_norms(m)
        got = m(ids)
    assert not m.cfg.tie_embeddings and all(torch.all(layer.norm.weight == 1) for layer in m.layers)
    assert rel_err(got, want) < 1e-10


def test_smooth_norm_into_in_proj():
    m, ids = lm_and_input()
    with torch.no_grad():
        want = m(ids)
        for layer in m.layers:
            fold.smooth_norm_into_linear(layer.norm, layer.mixer.in_proj, torch.rand(24, dtype=torch.float64) * 3 + 0.1)
        assert rel_err(m(ids), want) < 1e-10


def test_rotate_residual_lm_and_decode():
    m, ids = lm_and_input()
    with torch.no_grad():
        want = m(ids)
        fold.fuse_norms(m)
        fold.rotate_residual(m, random_orthogonal(24))
        got = m(ids)
        states = m.init_state(2, dtype=torch.float64)
        steps = []
        for t in range(ids.shape[1]):
            lg, states = m.step(ids[:, t], states)
            steps.append(lg)
    assert rel_err(got, want) < 1e-10
    assert rel_err(torch.stack(steps, 1), want) < 1e-10


def test_rotate_residual_vim_with_hadamard():
    m, x = vim_and_input()
    with torch.no_grad():
        want = m(x)
        fold.fuse_norms(m)
        fold.rotate_residual(m, torch.from_numpy(hadamard_matrix(24)))
        got = m(x)
    assert rel_err(got, want) < 1e-10


def test_rotation_needs_fused_norms():
    m, _ = lm_and_input()
    try:
        fold.rotate_residual(m, random_orthogonal(24))
    except ValueError as e:
        assert "fuse_norms" in str(e)
    else:
        raise AssertionError("rotating with weighted norms must be refused")


def test_online_out_rotation_lm_and_vim():
    m, ids = lm_and_input()
    v, x = vim_and_input()
    with torch.no_grad():
        want_m, want_v = m(ids), v(x)
        for model in (m, v):
            di = model.cfg.mixer.d_inner
            for layer in model.layers:
                fold.set_online_out_rotation(layer.mixer, torch.from_numpy(hadamard_matrix(di)))
        assert rel_err(m(ids), want_m) < 1e-10 and rel_err(v(x), want_v) < 1e-10
        states = m.init_state(2, dtype=torch.float64)
        lg = None
        for t in range(ids.shape[1]):
            lg, states = m.step(ids[:, t], states)
        assert rel_err(lg, want_m[:, -1]) < 1e-10


def test_rotate_dt_lowrank_lm_and_vim():
    m, ids = lm_and_input()
    v, x = vim_and_input()
    with torch.no_grad():
        want_m, want_v = m(ids), v(x)
        for model in (m, v):
            r = model.cfg.mixer.dt_rank
            for i, layer in enumerate(model.layers):
                for branch in (["", "_b"] if model.cfg.mixer.bimamba else [""]):
                    m1_folds.rotate_dt_lowrank(layer.mixer, random_orthogonal(r, seed=i), branch)
        assert rel_err(m(ids), want_m) < 1e-10 and rel_err(v(x), want_v) < 1e-10
        states = m.init_state(2, dtype=torch.float64)
        for t in range(ids.shape[1]):
            lg, states = m.step(ids[:, t], states)
        assert rel_err(lg, want_m[:, -1]) < 1e-10


def test_smooth_fused_gate_and_scan_bc_then_rotate():
    """Smooth-Fused rotation: smoothing factors folded into the gate and x_proj, then the online
    Hadamard; outputs unchanged (LM full sequence and decode; Vim both branches)."""
    m, ids = lm_and_input()
    v, x = vim_and_input()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        want_m, want_v = m(ids), v(x)
        for model in (m, v):
            di, n = model.cfg.mixer.d_inner, model.cfg.mixer.d_state
            for layer in model.layers:
                mixer = layer.mixer
                m1_folds.smooth_out_proj_into_gate(mixer, torch.rand(di, generator=g, dtype=torch.float64) * 4 + 0.2)
                for branch in (["", "_b"] if model.cfg.mixer.bimamba else [""]):
                    m1_folds.smooth_scan_bc(mixer, torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.2, branch)
                fold.set_online_out_rotation(mixer, torch.from_numpy(hadamard_matrix(di)))
        assert rel_err(m(ids), want_m) < 1e-10 and rel_err(v(x), want_v) < 1e-10
        states = m.init_state(2, dtype=torch.float64)
        steps = []
        for t in range(ids.shape[1]):
            lg, states = m.step(ids[:, t], states)
            steps.append(lg)
        assert rel_err(torch.stack(steps, 1), want_m) < 1e-10
