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
HYBRID_SAMPLE = os.path.join(SAMPLES, "hybrid-byte-lm")


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


def _sample_train_module(sample, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(sample, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


def test_hybrid_sample_beats_bigram_baseline():
    """The hybrid sample loads as a hybrid (one block config per layer, of three kinds, with the paths a
    plain model would not reach: shared SSD groups, GQA with RoPE) and predicts the held-out text."""
    loaded = load_model(HYBRID_SAMPLE)
    cfg = loaded.config
    assert loaded.format == "mq-deploy" and cfg.layers is not None and cfg.vocab_size == 256 and cfg.tie_embeddings
    by_kind = {}
    for m in cfg.layers:
        by_kind.setdefault(m.to_dict()["kind"], []).append(m)
    assert sorted(by_kind) == ["attention", "mamba2", "mlp"], sorted(by_kind)
    assert all(m.n_groups > 1 and m.n_heads > m.n_groups for m in by_kind["mamba2"])
    assert all(m.n_kv_heads < m.n_heads and m.rope_dim > 0 for m in by_kind["attention"])
    log = json.load(open(os.path.join(HYBRID_SAMPLE, "train_log.json")))
    r = evaluate(loaded, EvalConfig(limit=24, progress=False))
    print(r, "bigram", log["bigram_bits_per_byte"])
    assert r["metric"] == "bits_per_byte" and r["value"] < log["bigram_bits_per_byte"] - 0.5


def test_hybrid_sample_scores_and_calibrates_on_the_lm_samples_bytes():
    """Same held-out and calibration text as the Mamba1 (and so the Mamba2) sample: their figures compare."""
    for name in ("eval.txt", "calib.txt"):
        with open(os.path.join(HYBRID_SAMPLE, "data", name), "rb") as a, open(os.path.join(LM_SAMPLE, "data", name),
                                                                              "rb") as b:
            assert a.read() == b.read(), name


def test_hybrid_sample_is_what_its_train_script_builds():
    """The shipped config is the block stack train.py builds with its defaults (README and script agree),
    and the script trains through the Mamba2 sample's scan, loaded from that sample's file (not a copy)."""
    train = _sample_train_module(HYBRID_SAMPLE, "hybrid_sample_train")
    built = train.hybrid_config(train.parser().parse_args([]))
    loaded = load_model(HYBRID_SAMPLE).config
    assert [m.to_dict() for m in built.layers] == [m.to_dict() for m in loaded.layers]
    assert os.path.samefile(train.MAMBA2_TRAIN, os.path.join(MAMBA2_SAMPLE, "train.py"))
    assert not hasattr(train, "ssd_scan_train") and hasattr(train.mamba2_sample(), "ssd_scan_train")


@pytest.mark.parametrize("sample", [LM_SAMPLE, MAMBA2_SAMPLE, HYBRID_SAMPLE, VIM_SAMPLE])
def test_sample_weights_are_small(sample):
    assert os.path.getsize(os.path.join(sample, "model.safetensors")) <= 15 * 2**20
