import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "samples")
LM_SAMPLE = os.path.join(SAMPLES, "mamba-byte-lm")
VIM_SAMPLE = os.path.join(SAMPLES, "vim-fashion-mnist")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a, b):
    """max |a - b| / max |b|: the error measure our tolerances are stated in."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
