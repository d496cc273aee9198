"""Zero-copy decode on ONNX Runtime (OrtDecoder: states bound with IOBinding across steps) against the plain
feed-and-fetch loop on the same session and against PyTorch; the runner's default native library.

Tolerances: the bound loop and the numpy loop run the same session on the same values: bitwise equal.
Against PyTorch, 2e-5 relative (float32 both sides, different op order; test_export_graph's bound)."""

import os

import numpy as np
import pytest
import torch

from conftest import rel_err
from helpers import small_lm

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def step_onnx(tmp_path_factory):
    from mq_deploy.export.exporter import save_model_atomic
    from mq_deploy.export.graph import build_model

    m = small_lm(vocab=256, d_model=24, d_model2=24)
    path = str(tmp_path_factory.mktemp("dec") / "step.onnx")
    save_model_atomic(build_model(m, step=True), path)
    return m, path


def numpy_loop(runner, ids, steps):
    cfg = runner.meta["mq.config"]
    mx = cfg["mixer"]
    b = ids.shape[0]
    feeds = {"input_ids": ids, "conv_state": np.zeros((cfg["n_layer"], b, mx["d_inner"], mx["d_conv"] - 1), np.float32),
             "ssm_state": np.zeros((cfg["n_layer"], b, mx["d_inner"], mx["d_state"]), np.float32)}
    out, toks = [], []
    for _ in range(steps + 1):
        res = runner.infer(feeds)
        logits = res["logits"][:, -1]
        out.append(logits)
        tok = logits.argmax(-1)
        toks.append(tok)
        feeds = {"input_ids": tok.reshape(b, 1).astype(np.int64), "conv_state": res["conv_state_out"],
                 "ssm_state": res["ssm_state_out"]}
    return out, toks, res


@pytest.mark.parametrize("batch", [1, 3])
def test_bound_decode_equals_the_numpy_loop_and_pytorch(step_onnx, batch):
    from mq_deploy.backends.ort.runner import OrtRunner

    m, path = step_onnx
    r = OrtRunner(path)
    ids = np.random.default_rng(batch).integers(0, 256, (batch, 7)).astype(np.int64)
    want, toks, last = numpy_loop(r, ids, 12)
    dec = r.decoder(batch)
    got = [dec.prefill(ids)]
    for t in toks[:-1]:
        got.append(dec.step(t))
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), i
    st = dec.states()
    assert np.array_equal(st["ssm_state_out"], last["ssm_state_out"])
    assert np.array_equal(st["conv_state_out"], last["conv_state_out"])
    # PyTorch on the whole sequence: the same last-position logits
    seq = torch.from_numpy(np.concatenate([ids] + [t.reshape(batch, 1) for t in toks[:-1]], axis=1))
    with torch.no_grad():
        ref = m(seq)[:, -1]
    e = rel_err(torch.from_numpy(got[-1]), ref)
    print(f"batch {batch}: bound decode vs PyTorch {e:.2e}")
    assert e < 2e-5


def test_generate_uses_the_bound_decoder_and_matches_the_numpy_loop(step_onnx):
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate

    _, path = step_onnx
    r = OrtRunner(path)
    prompt = [3, 1, 4, 1, 5]
    _, toks, _ = numpy_loop(r, np.asarray([prompt], np.int64), 9)
    assert generate(r, prompt, 10) == [int(t[0]) for t in toks]


def test_native_library_is_the_default_and_no_native_opts_out(step_onnx):
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.ops import native

    _, path = step_onnx
    lib = native.ort_library()
    if lib is None and os.environ.get(native.ORT_LIB_ENV) is None:
        pytest.skip(f"{native.ort_library_path()} is not built")
    assert OrtRunner(path).custom_op_library == (os.environ.get(native.ORT_LIB_ENV) or lib)
    assert OrtRunner(path, custom_op_library=False).custom_op_library is None
