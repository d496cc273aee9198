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


# -- the registry, one calibration for every bit width, lower activation bits ----------------------

def test_recipes_module_is_torch_free_and_lists_the_registry():
    import subprocess
    import sys

    code = ("import sys; import mq_deploy.quant.recipes as r; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(r.recipe_names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ",".join(RECIPES) == "fp,rtn,smoothquant,quarot,mambaquant"


def test_a_new_recipe_is_one_registered_function():
    from mq_deploy.errors import MQUserError
    from mq_deploy.quant import recipes

    calls = []

    @recipes.register_recipe("test-hadamard-only", observers="mse")
    def hadamard_only(model, loop, cfg):
        """residual Hadamard only"""
        from mq_deploy.transforms import fold
        from mq_deploy.transforms.rotations import hadamard_rotation

        calls.append(cfg.recipe)
        fold.fuse_norms(model)
        fold.rotate_residual(model, hadamard_rotation(model.cfg.d_model))

    try:
        assert "test-hadamard-only" in recipes.recipe_names()
        assert recipes.get_recipe("test-hadamard-only").summary == "residual Hadamard only"
        with pytest.raises(ValueError, match="already registered"):
            recipes.register_recipe("test-hadamard-only")(hadamard_only)
        m = lm()
        res = apply_recipe(m, text_forward_loop(TEXT, 32, 4), RecipeConfig("test-hadamard-only", QuantConfig(8, 8)))
        assert calls == ["test-hadamard-only"] and res["act_scales"]
        assert RecipeConfig("test-hadamard-only").observer_spec().default.kind == "mse"
    finally:
        recipes._REGISTRY.pop("test-hadamard-only", None)
    with pytest.raises(MQUserError, match="unknown recipe 'test-hadamard-only'"):
        RecipeConfig("test-hadamard-only")


@pytest.mark.parametrize("recipe,bits,rounding", [("mambaquant", (4, 6), "rtn"), ("quarot", (8, 4), "rtn"),
                                                  ("mambaquant", (4, 8), "gptq")])
def test_one_calibration_serves_every_bit_width(recipe, bits, rounding):
    """compare's path (transform + calibrate once, round a copy per bit width) == apply_recipe from scratch."""
    import copy

    from mq_deploy.quant.compare import quantized_copy
    from mq_deploy.quant.recipes import calibrate_activations, get_recipe

    base = lm()
    fresh = copy.deepcopy(base)
    cfg = RecipeConfig(recipe, QuantConfig(*bits), observer="mse,out_proj=entropy,x=mse-out", weight_rounding=rounding)
    loop = text_forward_loop(TEXT, 32, 4)
    get_recipe(recipe).transform(base, loop, cfg)
    cal = calibrate_activations(base, loop, cfg, hessians=True)
    shared = quantized_copy(base, cal, *bits, rounding)
    apply_recipe(fresh, loop, cfg)
    ids = torch.from_numpy(TEXT[200:296].astype(np.int64).reshape(2, 48))
    with torch.no_grad():
        assert torch.equal(shared(ids), fresh(ids))


def test_lower_activation_bits_cost_more_and_every_observer_runs():
    import copy

    ids = torch.from_numpy(TEXT[100:196].astype(np.int64).reshape(2, 48))
    base = lm()
    want = base(ids).detach()
    errs = {}
    for ab in (8, 6, 4):
        m = copy.deepcopy(base)
        apply_recipe(m, text_forward_loop(TEXT, 32, 8), RecipeConfig("mambaquant", QuantConfig(8, ab)))
        with torch.no_grad():
            errs[ab] = rel_err(m(ids), want)
    print("mambaquant W8A8/A6/A4 rel err", errs)
    assert errs[8] < errs[6] < errs[4]
    for spec in ("minmax", "mse", "mse-out", "entropy"):
        m = copy.deepcopy(base)
        apply_recipe(m, text_forward_loop(TEXT, 32, 8), RecipeConfig("quarot", QuantConfig(8, 8), observer=spec))
        with torch.no_grad():
            e = rel_err(m(ids), want)
        assert 0 < e < 0.1, (spec, e)


def test_klt_from_the_last_layer_preserves_the_function_and_differs_from_the_sum():
    from mq_deploy.quant.recipes import residual_second_moment

    m = lm()
    loop = text_forward_loop(TEXT, 32, 4)
    last, total = residual_second_moment(m, loop, "last"), residual_second_moment(m, loop, "sum")
    assert not torch.allclose(last, total) and torch.allclose(last, last.t())
    ids = torch.from_numpy(TEXT[:96].astype(np.int64).reshape(2, 48))
    with torch.no_grad():
        want = m(ids)
        apply_recipe(m, loop, RecipeConfig("mambaquant", klt_source="last"), quantize=False)
        assert rel_err(m(ids), want) < 1e-5


def test_recipe_config_errors():
    from mq_deploy.errors import MQUserError

    for kw, needle in (({"weight_rounding": "awq"}, "--weight-rounding"), ({"observer": "kl"}, "unknown observer"),
                       ({"klt_source": "first"}, "klt_source"), ({"percentile": 50}, "percentile")):
        with pytest.raises(MQUserError, match=needle):
            RecipeConfig("mambaquant", **kw)
