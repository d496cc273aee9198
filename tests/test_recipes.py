"""Recipes: their transforms alone keep the FP function; quantized, they stay close to it."""

import numpy as np
import pytest
import torch

from mq_deploy.calib.collect import image_forward_loop, text_forward_loop
from mq_deploy.quant.fakequant import QuantConfig
from mq_deploy.quant.recipes import RECIPES, RecipeConfig, apply_recipe

from conftest import rel_err
from helpers import small_lm, small_vim

TEXT = np.frombuffer(b"And God said, Let there be light: and there was light. " * 30, dtype=np.uint8)


def lm():
    return small_lm(vocab=256, d_model=24, d_model2=24)


@pytest.mark.parametrize("recipe", RECIPES)
def test_transforms_preserve_fp_function(recipe):
    m = lm()
    ids = torch.from_numpy(TEXT[:96].astype(np.int64).reshape(2, 48))
    with torch.no_grad():
        want = m(ids)
        apply_recipe(m, text_forward_loop(TEXT, 32, 4), RecipeConfig(recipe), quantize=False)
        got = m(ids)
    # folds run in float64 and are stored back in float32: float32 rounding of the weights only
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", ["lm", "vim"])
def test_w8a8_close_to_fp(recipe, model):
    if model == "lm":
        m, loop = lm(), text_forward_loop(TEXT, 32, 8)
        x = torch.from_numpy(TEXT[100:196].astype(np.int64).reshape(2, 48))
    else:
        m = small_vim()
        imgs = torch.randn(40, 1, 12, 12)
        loop, x = image_forward_loop(imgs, 32, 8), imgs[32:]
    with torch.no_grad():
        want = m(x)
        res = apply_recipe(m, loop, RecipeConfig(recipe, QuantConfig(8, 8)))
        got = m(x)
    e = rel_err(got, want)
    print(f"{model} {recipe}: W8A8 rel err {e:.3e}")
    assert (e == 0) == (recipe == "fp") and e < 0.1
    if recipe != "fp":
        assert res["weight_scales"] and res["act_scales"]
