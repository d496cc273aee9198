import numpy as np
import pytest
import torch

from mq_deploy.calib.collect import calibrate, image_forward_loop, text_forward_loop
from mq_deploy.calib.observers import CovarianceObserver, MinMaxObserver
from mq_deploy.errors import MQUserError

from helpers import small_lm, small_vim


def test_calibrate_lm_collects_every_point_and_matches_direct_statistics():
    m = small_lm(vocab=256)
    tokens = np.frombuffer(b"In the beginning God created the heaven and the earth. " * 40, dtype=np.uint8)
    loop = text_forward_loop(tokens, seq_len=64, n_samples=6, batch=4)
    obs = calibrate(m, loop, lambda name: [MinMaxObserver(name), CovarianceObserver(name)])
    names = {f"layers.{i}.mixer.{p}" for i in range(2) for p in m.layers[0].mixer.family.points}
    assert set(obs) == names and loop.samples == 6
    # the in_proj input of layer 0 is norm(embedding): recompute it directly
    ids = torch.from_numpy(tokens[: 6 * 64].astype(np.int64).reshape(6, 64))
    with torch.no_grad():
        x = m.layers[0].norm(m.embedding(ids)).reshape(-1, m.cfg.d_model).double()
    mm, cov = obs["layers.0.mixer.in_proj"]
    assert torch.allclose(mm.amax(per_channel=True), x.abs().max(0).values, rtol=1e-6)
    assert torch.allclose(cov.second_moment(), x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-7)
    assert all(layer.mixer.act_hook is None for layer in m.layers)


def test_calibrate_vim_has_backward_branch_points():
    v = small_vim()
    obs = calibrate(v, image_forward_loop(torch.randn(10, 1, 12, 12), n_samples=8, batch=3),
                    lambda name: [MinMaxObserver(name)])
    assert "layers.0.mixer.x_b" in obs and "layers.1.mixer.C_b" in obs


def test_nan_in_calibration_names_layer_and_point():
    m = small_lm(vocab=256)
    with torch.no_grad():
        m.layers[1].mixer.x_proj.weight[0, 0] = float("nan")
    tokens = np.frombuffer(b"abcdefgh" * 40, dtype=np.uint8)
    with pytest.raises(MQUserError, match=r"NaN .* layers\.1\.mixer\.dt_low"):
        calibrate(m, text_forward_loop(tokens, 32, 2), lambda name: [MinMaxObserver(name)])
    assert all(layer.mixer.act_hook is None for layer in m.layers)


def test_calibration_split_holds_out_data_calibration_never_sees():
    """Defaults are chosen on the held-out part of the calibration data: disjoint from what calibrates."""
    from mq_deploy.data.text import read_bytes
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.compare import CalibConfig, calibration_loop, calibration_split

    from conftest import LM_SAMPLE, VIM_SAMPLE

    lm = load_model(LM_SAMPLE)
    loop, held = calibration_split(lm, CalibConfig(samples=8, seq_len=256))
    text = read_bytes(f"{LM_SAMPLE}/data/calib.txt")
    assert held[0] == "lm" and held[1].shape[1] == 1025 and len(held[1]) == (len(text) - 8 * 256 - 2) // 1024
    assert np.array_equal(held[1][0], text[8 * 256 + 1:8 * 256 + 1 + 1025])    # starts after the calibration bytes
    assert held[2].tolist() == [1024] * len(held[1])                           # bytes each window predicts

    vim = load_model(VIM_SAMPLE)
    seen = []

    class Probe:
        def __call__(self, x):
            seen.append(x)
            return torch.zeros(len(x), 10)

    probe = Probe()
    probe.patch_embed = vim.model.patch_embed
    loop, held = calibration_split(vim, CalibConfig(samples=100))
    loop(probe)
    calib = torch.cat(seen)
    assert len(calib) == 100 and held[0] == "vim" and len(held[1]) == len(held[2]) == 1024 - 100
    flat_c, flat_h = calib.reshape(100, -1), held[1].reshape(len(held[1]), -1)
    assert not any(torch.equal(flat_h[i], flat_c[j]) for i in range(0, len(flat_h), 37) for j in range(100))
    # calibration_loop is the same loop (same seeded shuffle): quantize and compare calibrate alike
    seen.clear()
    calibration_loop(vim, CalibConfig(samples=100))(probe)
    assert torch.equal(torch.cat(seen), calib)
