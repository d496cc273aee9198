"""Shared test factories and CLI helpers. Tests import these from here, never from each other."""

import subprocess
import sys

import torch

from mq_deploy.config import MambaLMConfig, VimConfig
from mq_deploy.families.mamba1 import MixerConfig
from mq_deploy.models.mamba import MambaLM
from mq_deploy.models.vim import Vim


def small_lm(**kw):
    cfg = MambaLMConfig(d_model=kw.pop("d_model", 20), n_layer=kw.pop("n_layer", 2), vocab_size=kw.pop("vocab", 50),
                        mixer=MixerConfig(d_model=kw.pop("d_model2", 20), **kw))
    m = MambaLM(cfg)
    m.reset_parameters(seed=1)
    g = torch.Generator().manual_seed(3)      # the same model in every test and every order of tests
    with torch.no_grad():  # make every parameter matter (biases and D away from their init)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return m.eval()


def small_vim(**kw):
    cfg = VimConfig(d_model=kw.pop("d_model", 24), n_layer=kw.pop("n_layer", 2), num_classes=7, img_size=kw.pop("img", 12),
                    patch_size=kw.pop("patch", 4), stride=kw.pop("stride", None), in_chans=kw.pop("chans", 1),
                    image_mean=kw.pop("mean", (0.5,)), image_std=kw.pop("std", (0.5,)))
    m = Vim(cfg)
    m.reset_parameters(seed=2)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return m.eval()


# A decode step batched with other sequences, against the same sequence run alone (tests/test_runtime_batch.py,
# tests/test_serve_server.py): ONNX Runtime may block a float GEMM differently for another batch size, so the
# last bits may differ, and a float on a QuantizeLinear rounding boundary may move one int8 step.
BATCH_RTOL = 1e-5       # max |batched - alone| <= BATCH_RTOL * max |alone|


def batch_error(got, want) -> float:
    """max |got - want| / max |want|, in float64 (inf if the shapes differ)."""
    import numpy as np

    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got.astype(np.float64) - want).max() / max(float(np.abs(want).max()), 1e-30))


def run_cli(*args, timeout=300, **kw):
    """The real command line in a fresh interpreter (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "mq_deploy", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def assert_user_error(capsys, argv, *needles):
    """In-process CLI call that must end in one clear error line (exit 2, no traceback)."""
    from mq_deploy.cli.main import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


_TINY_EXPORTS = {}


def tiny_exports():
    """Quantized (mambaquant W8A8) ONNX exports of a tiny byte-level LM (full and decode-step graph)
    and a tiny Vim: {"lm", "lm_step", "vim", "lm_q", "vim_q"}. Made once per test process (in a
    temporary folder removed at exit) and shared by the modules that use them."""
    import atexit
    import shutil
    import tempfile

    if not _TINY_EXPORTS:
        d = tempfile.mkdtemp(prefix="mq-tiny-exports-")
        atexit.register(shutil.rmtree, d, True)
        _TINY_EXPORTS.update(_make_tiny_exports(d))
    return dict(_TINY_EXPORTS)


def _make_tiny_exports(d):
    import os

    import numpy as np

    from mq_deploy.cli.main import main
    from mq_deploy.data.images import write_idx
    from mq_deploy.models.io import save_model

    d = str(d)
    text = os.path.join(d, "text.txt")
    with open(text, "wb") as f:
        f.write(b"And God said, Let there be light: and there was light. And God saw the light, that it was good. " * 40)
    imgs = os.path.join(d, "img")
    os.makedirs(imgs)
    rng = np.random.default_rng(0)
    write_idx(os.path.join(imgs, "calib-images-idx3-ubyte.gz"), rng.integers(0, 255, (16, 12, 12)))
    write_idx(os.path.join(imgs, "calib-labels-idx1-ubyte.gz"), rng.integers(0, 7, 16))
    out = {k: os.path.join(d, f) for k, f in (("lm", "lm.onnx"), ("lm_step", "lm_step.onnx"), ("vim", "vim.onnx"),
                                               ("lm_q", "lm_q"), ("vim_q", "vim_q"))}
    lm = str(save_model(small_lm(vocab=256, d_model=32, d_model2=32), os.path.join(d, "lm_fp")))
    assert main(["quantize", lm, "-o", out["lm_q"], "--calib", text, "--calib-samples", "4"]) == 0
    assert main(["export", out["lm_q"], "-o", out["lm"]]) == 0
    assert main(["export", out["lm_q"], "-o", out["lm_step"], "--decode-step"]) == 0
    vim = str(save_model(small_vim(), os.path.join(d, "vim_fp")))
    assert main(["quantize", vim, "-o", out["vim_q"], "--calib", imgs]) == 0
    assert main(["export", out["vim_q"], "-o", out["vim"]]) == 0
    return out


# --- issue 9: BPE tokenizers trained here on KJV text (the LM sample's own data slices) ---
def kjv_slices():
    """(train text, held-out text): the LM sample's calibration slice and its held-out slice of the KJV."""
    import os

    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "mamba-byte-lm", "data")
    return (open(os.path.join(d, "calib.txt"), encoding="utf-8").read(),
            open(os.path.join(d, "eval.txt"), encoding="utf-8").read())


def train_bpe(path, vocab_size=400, text=None):
    """A GPT-NeoX-style byte-level BPE tokenizer.json (<|endoftext|> = id 0) trained with `tokenizers`."""
    from mq_deploy.data.tokenizer import train_byte_level_bpe

    return train_byte_level_bpe(path, [text if text is not None else kjv_slices()[0]], vocab_size)


# ---- native scan inputs (CPU library, emulated CUDA, real CUDA tests) -------------------------

def q8(*shape, g):
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)


def make(b, L, d, n, z=True, gate=False, h0=False, seed=0):
    """Fresh random codes and float parameters, scales picked so dt = softplus(.) spans ~0.05..3."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(qx=q8(b, L, d, g=g), x_scale=0.02, qdelta=q8(b, L, d, g=g), delta_scale=0.015,
              A=-torch.rand(d, n, generator=g) * 2 - 0.05, qB=q8(b, L, n, g=g), B_scale=0.03,
              qC=q8(b, L, n, g=g), C_scale=0.025, D=torch.randn(d, generator=g),
              delta_bias=torch.randn(d, generator=g) * 0.5 - 1.0)
    if z:
        kw.update(qz=q8(b, L, d, g=g), z_scale=0.03)
    if gate:
        kw["gate_scale"] = torch.rand(d, generator=g) * 1.5 + 0.25
    if h0:
        kw["initial_state"] = torch.randn(b, d, n, generator=g)
    return kw


BIG_BIAS = 24.0   # delta_bias of every third channel in with_edges: delta + bias in (22, 26)


def with_edges(kw, seed=0):
    """make()'s inputs with the values its draws never reach: -128 (QuantizeLinear's lowest code; q8 draws
    -127..127) in about a tenth of every int8 input, its first and last element included, and a delta_bias
    of BIG_BIAS on every third channel, so that delta + bias > 20 there (torch's softplus returns its input
    above 20; the kernels compute max(v, 0) + log1p(exp(-|v|)) everywhere). Returns (inputs, mask of the
    large-dt channels) so tests can check those channels and the others apart: they differ in magnitude."""
    g = torch.Generator().manual_seed(seed + 7919)
    out = dict(kw)
    for k in ("qx", "qdelta", "qB", "qC", "qz"):
        if out.get(k) is not None:
            q = out[k].clone()
            q[torch.rand(q.shape, generator=g) < 0.1] = -128
            flat = q.view(-1)
            flat[0] = flat[-1] = -128
            out[k] = q
    big = torch.zeros(kw["qx"].shape[-1], dtype=torch.bool)
    big[::3] = True
    bias = out["delta_bias"].clone() if out.get("delta_bias") is not None else torch.zeros(big.shape)
    bias[big] = BIG_BIAS
    out["delta_bias"] = bias
    return out, big


def decode_steps(kw, run_step):
    """Run a scan as L decode steps with the state updated in place: run_step(inputs of step t, state)
    returns y [b, 1, d]. Returns (y of all steps [b, L, d], final state)."""
    state = kw["initial_state"].clone()
    ys = []
    for t in range(kw["qx"].shape[1]):
        step = dict(kw, initial_state=state)
        for k in ("qx", "qdelta", "qB", "qC", "qz"):
            step[k] = kw[k][:, t:t + 1]
        ys.append(run_step(step, state))
    return torch.cat(ys, 1), state


def ort_lib_marker():
    """(path of libmq_scan_ort.so, pytest skip mark for tests that need it). Skipped when it is not built,
    unless MQ_REQUIRE_NATIVE=1 (CI) or MQ_REQUIRE_ORT_LIB=1 turn the skip into a failure."""
    import os

    import pytest

    from mq_deploy.ops import native

    lib = native.ort_library_path()
    required = os.environ.get("MQ_REQUIRE_ORT_LIB") == "1" or os.environ.get("MQ_REQUIRE_NATIVE") == "1"
    return lib, pytest.mark.skipif(not required and not os.path.isfile(lib),
                                   reason=f"{lib} is not built: {native.BUILD_HINT}")


def ort_session(model, so=None):
    """An ONNX Runtime CPU session with mq-deploy's session options (the exact int8 GEMM on CPUs without
    VNNI: backends.ort.runner.EXACT_INT8_CONFIG); `model` a ModelProto, bytes or path."""
    import onnxruntime as ort

    from mq_deploy.backends.ort.runner import exact_int8

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model, exact_int8(so or ort.SessionOptions()), providers=["CPUExecutionProvider"])


def step_graph_decode(model, config, ids, prefill: int):
    """The FP32 decode-step graph of `model` in ONNX Runtime, fed as a runtime feeds it: `ids[:, :prefill]` in
    one call from fresh states (families.zero_states), then one token per call, each call's state outputs
    (families.state_inputs) fed back. Returns (logits [b, L, V] of every position, {output: array} of the
    last call)."""
    import numpy as np

    from mq_deploy.export.graph import build_model
    from mq_deploy.families import state_inputs, zero_states

    ids = np.asarray(ids)
    sess = ort_session(build_model(model, step=True))
    layout = state_inputs(config)
    names = ["logits"] + [si.output for si in layout]
    res = sess.run(names, {"input_ids": ids[:, :prefill], **zero_states(config, ids.shape[0])})
    outs = [res[0]]
    for t in range(prefill, ids.shape[1]):
        res = sess.run(names, {"input_ids": ids[:, t:t + 1], **{si.name: r for si, r in zip(layout, res[1:])}})
        outs.append(res[0])
    return np.concatenate(outs, 1), dict(zip(names, res))


def quantize_export_verify(tmp_path, capsys, path, text, *flags):
    """The command line as a user runs it on a hybrid: `quantize PATH -o q FLAGS` on 4 windows of `text`, then
    the full and the decode-step export, each `verify`-ed against q on 4 windows (PASSED). Returns q."""
    from mq_deploy.cli.main import main

    q = str(tmp_path / "q")
    assert main(["quantize", str(path), "-o", q, *flags, "--calib", text, "--calib-samples", "4",
                 "--seq-len", "64"]) == 0
    for extra, name in (([], "m.onnx"), (["--decode-step"], "step.onnx")):
        assert main(["export", q, "-o", str(tmp_path / name), *extra]) == 0
        capsys.readouterr()
        assert main(["verify", str(tmp_path / name), "--reference", q, "--data", text, "--limit", "4",
                     "--seq-len", "64"]) == 0
        assert "PASSED" in capsys.readouterr().out
    return q


def tiny_hybrid_steps(root, pattern="M*-M*", kv_caches=("fp32",)):
    """A tiny Nemotron-H hybrid (Mamba2 + attention with a KV cache + squared-ReLU MLP, `pattern`, byte vocab)
    written by transformers under root/hf, quantized W8A8 per KV cache storage and exported as decode-step
    graphs: {kv: (step ONNX, quantized checkpoint)}."""
    import torch
    import transformers

    from mq_deploy.cli.main import main

    text = root / "text.txt"
    text.write_bytes(b"In the beginning God created the heaven and the earth. And God said, Let there be light. " * 60)
    torch.manual_seed(0)
    m = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        vocab_size=256, hidden_size=32, hybrid_override_pattern=pattern, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
        chunk_size=8))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(root / "hf")
    out = {}
    for kv in kv_caches:
        (root / kv).mkdir()
        q, step = str(root / kv / "q"), str(root / kv / "step.onnx")      # the repository's model is "step"
        assert main(["quantize", str(root / "hf"), "-o", q, "--calib", str(text), "--calib-samples", "2",
                     "--seq-len", "64", "--kv-cache", kv]) == 0
        assert main(["export", q, "-o", step, "--decode-step"]) == 0
        out[kv] = (step, q)
    return out


def max_rel(a, b) -> float:
    """max |a - b| / max |b| (arrays or tensors): the relative error the family parity tests state."""
    import numpy as np
    import torch

    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max())


def torch_steps(model, ids, split):
    """Logits [b, L - split, V] of our PyTorch LM fed ids[:, :split] as one prefill, then one token per step()."""
    import torch

    with torch.no_grad():
        _, st = model(ids[:, :split], return_state=True)
        out = []
        for t in range(split, ids.shape[1]):
            lg, st = model.step(ids[:, t], st)
            out.append(lg)
    return torch.stack(out, 1)


def save_hf(m, path, dtype=None):
    """transformers' save_pretrained of model m into path: float32, or (dtype) a sharded folder in that dtype
    (60 KB shards, so even tiny models span several files). Returns (the model as saved, in float32, path)."""
    if dtype is not None:
        m = m.to(dtype)
        m.save_pretrained(path, max_shard_size="60KB")
        return m.float(), path
    m.save_pretrained(path)
    return m, path
