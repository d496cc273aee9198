"""HF folders written by transformers' own save_pretrained: Mamba and FalconMamba, fp32 / bf16 / fp16,
single file and sharded. Our model computes in float32 whatever the stored dtype.

Parity with transformers is stated as max |ours - theirs| / max |theirs| of the logits:
<= 1e-4 on float32 weights (observed ~1e-7; the two implementations sum in different orders).
For bf16/fp16 folders the reference is transformers' model upcast to float32 after loading the same
folder, since a half-precision CPU forward in transformers rounds every intermediate to 8/11 bits.
"""

import os

import pytest
import torch

from mq_deploy.models.loaders import load_model

from conftest import rel_err

transformers = pytest.importorskip("transformers")

FALCON_CONFIGS = [
    dict(hidden_size=24, num_hidden_layers=2, tie_word_embeddings=True),
    dict(hidden_size=27, num_hidden_layers=2, time_step_rank=5, tie_word_embeddings=False),
    dict(hidden_size=20, num_hidden_layers=3, state_size=8, mixer_rms_eps=1e-3, use_conv_bias=False, use_bias=True),
]


def hf_lm(kind="mamba", **kw):
    cfg = dict(vocab_size=61, state_size=16)
    cfg.update(kw)
    if kind == "falcon":
        m = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**cfg))
    else:
        m = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg))
    with torch.no_grad():  # move D, biases and norms off their init so every tensor matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _decode_parity(m, loaded, prompt_len=7, new=5):
    """Our step-by-step decode against transformers' own cached decode (generate)."""
    ids = torch.randint(0, 61, (1, prompt_len))
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
        theirs_tokens = out.sequences[0, prompt_len:]
        theirs_logits = torch.stack(out.logits, 1)[0]
        logits, states = loaded.model(ids, return_state=True)
        last, ours = logits[:, -1], []
        for t in theirs_tokens:   # teacher-forced on their tokens, so the logits line up step by step
            ours.append(last[0])
            last, states = loaded.model.step(t.view(1), states)
    e = rel_err(torch.stack(ours), theirs_logits)
    return e, theirs_tokens


@pytest.mark.parametrize("kw", FALCON_CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_falcon_mamba_parity(tmp_path, kw):
    m = hf_lm("falcon", **kw)
    m.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.format == "hf-falcon-mamba"
    assert loaded.config.mixer.mixer_rms_eps == kw.get("mixer_rms_eps", 1e-6)
    ids = torch.randint(0, 61, (2, 23))
    with torch.no_grad():
        e = rel_err(loaded.model(ids), m(ids).logits)
    e_step, _ = _decode_parity(m, loaded)
    print(f"{kw}: full rel err {e:.2e}, decode rel err {e_step:.2e}")
    assert e <= 1e-4 and e_step <= 1e-4


def test_falcon_norms_matter(tmp_path):
    """Without the B/C/dt norms the model is a different function: the test above can fail."""
    m = hf_lm("falcon", hidden_size=24, num_hidden_layers=2)
    m.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.randint(0, 61, (1, 15))
    with torch.no_grad():
        want = m(ids).logits
        for layer in loaded.model.layers:
            layer.mixer.cfg.mixer_rms_eps = None
        e = rel_err(loaded.model(ids), want)
    print(f"rel err without the norms {e:.2e}")
    assert e > 1e-2


def test_mamba_decode_parity(tmp_path):
    m = hf_lm(hidden_size=24, num_hidden_layers=2)
    m.save_pretrained(tmp_path)
    e, _ = _decode_parity(m, load_model(str(tmp_path)))
    print(f"decode rel err {e:.2e}")
    assert e <= 1e-4


@pytest.mark.parametrize("kind", ["mamba", "falcon"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_folders_sharded(tmp_path, kind, dtype):
    m = hf_lm(kind, hidden_size=32, num_hidden_layers=3, tie_word_embeddings=False).to(dtype)
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") and len(shards) > 1
    loaded = load_model(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    cls = transformers.FalconMambaForCausalLM if kind == "falcon" else transformers.MambaForCausalLM
    ref = cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    # the stored values are exactly the half-precision ones
    w = ref.backbone.layers[1].mixer.in_proj.weight
    assert torch.equal(loaded.model.layers[1].mixer.in_proj.weight, w)
    ids = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        e = rel_err(loaded.model(ids), ref(ids).logits)
    print(f"{kind} {dtype}: rel err {e:.2e}")
    assert e <= 1e-4


def test_loading_streams_tensor_by_tensor(tmp_path, monkeypatch):
    """The loader never holds a whole state dict: at most one checkpoint tensor is alive at a time."""
    from mq_deploy.models import loaders

    m = hf_lm(hidden_size=32, num_hidden_layers=2).to(torch.bfloat16)
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    alive, peak = [0], [0]
    real_get = loaders.SafetensorsSource.get

    def get(self, name):
        t = real_get(self, name)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        import weakref
        weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
        return t
    monkeypatch.setattr(loaders.SafetensorsSource, "get", get)
    load_model(str(tmp_path))
    print(f"peak tensors alive: {peak[0]}")
    assert peak[0] == 1


def test_hub_cache_snapshot_symlinks_load(tmp_path):
    """The HF hub cache keeps snapshots/<rev>/<file> as symlinks into ../../blobs: that layout loads,
    while a symlink anywhere else out of the folder is refused (test_bad_inputs)."""
    m = hf_lm(hidden_size=16, num_hidden_layers=2)
    src = tmp_path / "saved"
    m.save_pretrained(src, max_shard_size="20KB")
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(src))):
        os.rename(src / f, repo / "blobs" / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / f)
    loaded = load_model(str(snap))
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert rel_err(loaded.model(ids), m(ids).logits) <= 1e-4


def test_non_utf8_path_is_read(tmp_path):
    """A folder whose name is not UTF-8 (bytes kept as surrogate escapes) is read, not called corrupt."""
    m = hf_lm(hidden_size=16, num_hidden_layers=1)
    d = os.path.join(os.fsdecode(bytes(tmp_path)), os.fsdecode(b"mod\xe9le"))
    m.save_pretrained(tmp_path / "ascii")
    os.rename(tmp_path / "ascii", d)
    loaded = load_model(d)
    ids = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        assert rel_err(loaded.model(ids), m(ids).logits) <= 1e-4
