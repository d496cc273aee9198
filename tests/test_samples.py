"""The shipped sample models load through the public loader and do their job on their shipped data.

Loose floors, well below the measured metrics in the samples' READMEs: these check that the committed
weights and data are intact and wired up, not the training run (the README's first command prints
the full metrics).
"""

import importlib.util
import json
import os

import pytest

from mq_deploy.evaluate import EvalConfig, evaluate
from mq_deploy.models.loaders import load_model

from conftest import LM_SAMPLE, SAMPLES, VIM_SAMPLE

MAMBA2_SAMPLE = os.path.join(SAMPLES, "mamba2-byte-lm")


def test_vim_sample_top1_on_first_1000():
    loaded = load_model(VIM_SAMPLE)
    assert loaded.format == "mq-deploy" and loaded.config.mixer.d_inner == 384
    r = evaluate(loaded, EvalConfig(limit=1000, progress=False))
    print(r)
    assert r["metric"] == "top1" and r["samples"] == 1000 and r["value"] > 0.85


def test_lm_sample_beats_bigram_baseline():
    loaded = load_model(LM_SAMPLE)
    d_inner = loaded.config.mixer.d_inner
    assert d_inner & (d_inner - 1) != 0, "the LM sample must have a non-power-of-two d_inner"
    log = json.load(open(os.path.join(LM_SAMPLE, "train_log.json")))
    r = evaluate(loaded, EvalConfig(limit=24, progress=False))
    print(r, "bigram", log["bigram_bits_per_byte"])
    assert r["metric"] == "bits_per_byte" and r["value"] < log["bigram_bits_per_byte"] - 0.5


def test_mamba2_sample_beats_bigram_baseline():
    loaded = load_model(MAMBA2_SAMPLE)
    cfg = loaded.config
    mixer = cfg.mixer.to_dict()
    assert loaded.format == "mq-deploy" and mixer["kind"] == "mamba2" and cfg.vocab_size == 256 and cfg.tie_embeddings
    # the paths a plain Mamba2 would not reach: B/C groups shared by several heads, and a head_dim that
    # is not a power of two
    assert mixer["n_groups"] > 1 and cfg.mixer.n_heads > mixer["n_groups"]
    assert mixer["head_dim"] & (mixer["head_dim"] - 1) != 0
    log = json.load(open(os.path.join(MAMBA2_SAMPLE, "train_log.json")))
    r = evaluate(loaded, EvalConfig(limit=24, progress=False))
    print(r, "bigram", log["bigram_bits_per_byte"])
    assert r["metric"] == "bits_per_byte" and r["value"] < log["bigram_bits_per_byte"] - 0.5


def test_mamba2_sample_scores_and_calibrates_on_the_lm_samples_bytes():
    """Same held-out and calibration text as the Mamba1 sample, so their figures compare."""
    for name in ("eval.txt", "calib.txt"):
        with open(os.path.join(MAMBA2_SAMPLE, "data", name), "rb") as a, open(os.path.join(LM_SAMPLE, "data", name),
                                                                              "rb") as b:
            assert a.read() == b.read(), name


def test_mamba2_sample_training_scan_matches_ssd_scan():
    """The sample trains through its own SSD scan with a hand-written backward; values and gradients
    equal the library's ssd_scan under autograd (float64: only summation order differs, 1e-10)."""
    spec = importlib.util.spec_from_file_location("mamba2_sample_train", os.path.join(MAMBA2_SAMPLE, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    for seed in (0, 1):
        err = train.check_training_scan(seed)
        assert err < 1e-10


@pytest.mark.parametrize("sample", [LM_SAMPLE, MAMBA2_SAMPLE, VIM_SAMPLE])
def test_sample_weights_are_small(sample):
    assert os.path.getsize(os.path.join(sample, "model.safetensors")) <= 15 * 2**20
