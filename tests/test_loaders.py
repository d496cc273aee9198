"""Real checkpoint directories in, our model out, same numbers as the project that wrote them.

HF transformers is the parity reference: tiny MambaForCausalLM models are created and saved by
transformers itself; our logits must match transformers' to <= 1e-4 relative (float32; observed ~3e-7).
"""

import argparse
import json
import os

import pytest
import torch

from mq_deploy.models.io import save_model
from mq_deploy.models.loaders import detect_format, load_model

import reference_impl as ref
from conftest import rel_err
from helpers import small_lm, small_vim

transformers = pytest.importorskip("transformers")

HF_CONFIGS = [
    dict(hidden_size=24, num_hidden_layers=1, tie_word_embeddings=True),
    dict(hidden_size=24, num_hidden_layers=2, tie_word_embeddings=False),
    dict(hidden_size=27, num_hidden_layers=3, time_step_rank=5),                  # odd width, explicit rank
    dict(hidden_size=20, num_hidden_layers=2, use_conv_bias=False, use_bias=True),
    dict(hidden_size=33, num_hidden_layers=2, state_size=4, expand=3, conv_kernel=3, tie_word_embeddings=False),
]


def hf_model(**kw):
    cfg = dict(vocab_size=61, state_size=16)
    cfg.update(kw)
    m = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg)).eval()
    with torch.no_grad():  # move D, biases and norms off their init so every tensor matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("kw", HF_CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_hf_transformers_parity(tmp_path, kw):
    m = hf_model(**kw)
    m.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.format == "hf-mamba"
    ids = torch.randint(0, 61, (2, 23))
    with torch.no_grad():
        want = m(ids).logits
        got = loaded.model(ids)
    e = rel_err(got, want)
    print(f"{kw}: rel err {e:.2e}")
    assert e <= 1e-4


def test_hf_sharded_index(tmp_path):
    m = hf_model(hidden_size=48, num_hidden_layers=3, tie_word_embeddings=False)
    m.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    loaded = load_model(str(tmp_path))
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert rel_err(loaded.model(ids), m(ids).logits) <= 1e-4


def hf_to_mamba_ssm_dir(m, path, vocab_size, pad_multiple):
    """Write m as mamba-ssm's MambaLMHeadModel.save_pretrained would: config.json + pytorch_model.bin."""
    c = m.config
    sd = {}
    for k, v in m.state_dict().items():
        sd[k.replace("backbone.embeddings.", "backbone.embedding.")] = v.clone()
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    os.makedirs(path, exist_ok=True)
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": vocab_size,
           "ssm_cfg": {"layer": "Mamba1", "d_state": c.state_size, "d_conv": c.conv_kernel}, "attn_layer_idx": [],
           "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": pad_multiple, "tie_embeddings": True}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_mamba_ssm_directory(tmp_path):
    # vocab 61 padded to a multiple of 8 -> 64 embedding rows, as MambaLMHeadModel does
    m = hf_model(vocab_size=64, hidden_size=24, num_hidden_layers=2, tie_word_embeddings=True)
    hf_to_mamba_ssm_dir(m, tmp_path, vocab_size=61, pad_multiple=8)
    loaded = load_model(str(tmp_path))
    assert loaded.format == "mamba-ssm" and loaded.config.vocab_size == 64
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        assert rel_err(loaded.model(ids), m(ids).logits) <= 1e-4


def test_mamba_ssm_unsupported_configs(tmp_path):
    m = hf_model(hidden_size=16, num_hidden_layers=1)
    hf_to_mamba_ssm_dir(m, tmp_path, 61, 1)
    cfg = json.load(open(tmp_path / "config.json"))
    for change, msg in (({"ssm_cfg": {"layer": "Mamba2"}}, "Mamba2"), ({"attn_layer_idx": [0]}, "attention"),
                        ({"d_intermediate": 64}, "MLP"), ({"rms_norm": False}, "LayerNorm")):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**cfg, **change}, f)
        with pytest.raises(Exception, match=msg):
            load_model(str(tmp_path))


def test_vim_pth_checkpoint(tmp_path):
    """A .pth as hustvl/Vim's main.py writes it: {"model": state_dict, "args": Namespace, ...}."""
    m = small_vim(img=10, patch=4, stride=2)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    path = tmp_path / "vim_t.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 3, "args": argparse.Namespace(model="vim_tiny")}, path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"stride": 2, "image_mean": [0.5], "image_std": [0.5]}, f)
    for target in (str(path), str(tmp_path)):
        loaded = load_model(target)
        cfg = loaded.config
        assert loaded.format == "vim" and cfg.n_layer == 2 and cfg.num_classes == 7
        images = torch.randn(2, 1, cfg.img_size, cfg.img_size, dtype=torch.float64)
        with torch.no_grad():
            want = ref.vim_forward({k: v.double() for k, v in sd.items()}, images, 4, cfg.stride, cfg.mixer.dt_rank, 16)
            got = loaded.model.double()(images)
        assert rel_err(got, want) < 1e-10
    # a state dict cannot tell the stride: without config.json it defaults to the patch size
    # (as in hustvl's released models), and img_size follows from the token count
    os.remove(tmp_path / "config.json")
    cfg = load_model(str(path)).config
    assert (cfg.stride, cfg.img_size, cfg.num_patches) == (4, 16, 16)


def test_vim_pth_ddp_prefix_and_bare_state_dict(tmp_path):
    m = small_vim()
    torch.save({"module." + k: v for k, v in m.state_dict().items()}, tmp_path / "ckpt.pth")
    loaded = load_model(str(tmp_path / "ckpt.pth"))
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert rel_err(loaded.model(x), m(x)) < 1e-6


@pytest.mark.parametrize("tied", [True, False])
def test_our_format_round_trip(tmp_path, tied):
    m = small_lm()
    m.cfg.tie_embeddings = tied
    if not tied:
        from mq_deploy.models.mamba import MambaLM
        m2 = MambaLM(m.cfg)
        m2.load_state_dict(m.state_dict())
        m = m2.eval()
    save_model(m, tmp_path / "out", extra={"note": "x"})
    assert detect_format(str(tmp_path / "out")) == "mq-deploy"
    loaded = load_model(str(tmp_path / "out"))
    assert loaded.extra == {"note": "x"} and loaded.config.tie_embeddings == tied
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), m(ids))
    with pytest.raises(Exception, match="already exists"):
        save_model(m, tmp_path / "out")


def test_large_tensors_are_read_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """Past loaders._FILL_BLOCK_BYTES (here 1 KiB) a tensor is read and copied a block of rows at a time (a 256000-token
    embedding is 4 GiB, its copy as read as much again): the same model as read whole, from a sharded bf16 checkpoint
    and from an mq-deploy one; a NaN in a later block is still one line naming the tensor."""
    from mq_deploy.models import loaders

    m = hf_model(hidden_size=48, num_hidden_layers=2, tie_word_embeddings=False)
    m.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    whole = load_model(str(tmp_path / "hf")).model.state_dict()
    calls = []
    get_rows = loaders.SafetensorsSource.get_rows

    def recorded(self, name, start, stop):
        calls.append((name, start, stop))
        return get_rows(self, name, start, stop)

    monkeypatch.setattr(loaders, "_FILL_BLOCK_BYTES", 1024)
    monkeypatch.setattr(loaders.SafetensorsSource, "get_rows", recorded)
    blocks = load_model(str(tmp_path / "hf"))
    assert {n for n, _, _ in calls} >= {"backbone.embeddings.weight", "lm_head.weight"}
    assert max(b - a for n, a, b in calls if n == "lm_head.weight") == 1024 // (48 * 4)     # 5 rows of 48 floats
    got = blocks.model.state_dict()
    assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in whole)
    save_model(blocks.model, tmp_path / "ours")
    assert all(torch.equal(v, whole[k]) for k, v in load_model(str(tmp_path / "ours")).model.state_dict().items())

    from safetensors.torch import load_file, save_file

    path = tmp_path / "ours" / "model.safetensors"
    sd = load_file(path)
    sd["embedding.weight"][-1, 3] = float("nan")        # in the last block of rows
    os.unlink(path)
    save_file(sd, path)
    with pytest.raises(Exception, match="embedding.weight holds NaN"):
        load_model(str(tmp_path / "ours"))
