"""The shipped sample models load through the public loader and do their job on their shipped data.

Loose floors, well below the measured metrics in the samples' READMEs: these check that the committed
weights and data are intact and wired up, not the training run (the README's first command prints
the full metrics).
"""

import json
import os

import pytest

from mq_deploy.evaluate import EvalConfig, evaluate
from mq_deploy.models.loaders import load_model

from conftest import LM_SAMPLE, VIM_SAMPLE


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


@pytest.mark.parametrize("sample", [LM_SAMPLE, VIM_SAMPLE])
def test_sample_weights_are_small(sample):
    assert os.path.getsize(os.path.join(sample, "model.safetensors")) <= 15 * 2**20
