"""Decode states stored as float16 or int8 between calls (issue 23: `export --decode-step --state-dtype`).

- the rounding rule (models.state_codec) in PyTorch and as ONNX nodes, on rows that reach the edges (all zero,
  ties, a row whose largest value is 1e30 (past the float16 scale's range: saturates) or 1e-30, negative
  extremes, amax at float16's binade edges and in its subnormals): equal codes and scales; the float16 scale
  never rounds below amax / 127 (no code clips) and is at most 2^-9 coarser;
- the step graph of the LM samples (Mamba1, Mamba2) and of a transformers-written Nemotron-H hybrid (Mamba2 +
  attention), W8A8, fed as `generate` feeds it (a prefill, then one token per call) next to the PyTorch
  reference storing its states the same way: logits within 1e-4 relative of the reference's, states within
  one int8 unit (float32 sums in another order can move a rounding tie) on <= 1 % of the entries;
- what a sequence's state costs: int8 >= 3.5x fewer bytes than float32 on both samples (Mamba1, d_state 16: a
  float16 scale per 16 codes), fp16 2x;
- the command line: quantize -> export --state-dtype int8 -> verify PASSED -> generate;
- bad input: int8 on a float model, --state-dtype without --decode-step, a float32 state fed to an int8
  graph, a state of another shape: one line each."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mq_deploy.cli.main import main
from mq_deploy.config import STATE_DTYPES
from mq_deploy.families import StateInput, StateSpec, state_inputs, zero_states
from mq_deploy.models import state_codec

from helpers import assert_user_error, max_rel, ort_session

SAMPLES = {"mamba1": "samples/mamba-byte-lm", "mamba2": "samples/mamba2-byte-lm"}


def _edge_rows(shape=(3, 8, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-1])
    h[0, 0] = 0                                  # an all-zero row: scale SCALE_MIN, codes 0
    h[0, 1] = torch.arange(shape[-1]) - 8.0      # largest |h| 8 at -8: codes 127 k / 8, near ties
    h[0, 2] = 1e30 * torch.linspace(-1, 1, shape[-1])      # past the range: saturates
    h[0, 3] = 1e-30 * torch.linspace(-1, 1, shape[-1])
    h[0, 4] = 127 * 65504 * torch.linspace(-1, 1, shape[-1])   # the range's end: the largest scale, exact
    h[1, 0, :] = -3.0                            # a row of equal negatives: all -127
    h[1, 1, :] = 0.5 * torch.arange(shape[-1]) * (127 / 7.5) / 127
    # amax / 127 at and beside float16's binade edges and in its subnormals, where rounding to nearest would
    # otherwise land below it
    edges = [2.0 ** -14, 2.0 ** -14 * (1 - 2 ** -12), 1.0 * (1 + 2 ** -11), 3 * 2.0 ** -25, 1e-7, 5e-6, 2.0 ** 15]
    for k, a in enumerate(edges):
        h[2, k] = torch.linspace(-1, 1, shape[-1]) * (127 * a)
    return h


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_codec_graph_equals_the_pytorch_rule(dtype):
    h = _edge_rows()
    spec = StateSpec("ssm_state", tuple(h.shape[1:]), dtype=dtype, int8_scale="rows")
    si = StateInput("ssm_state", "ssm_state_out", tuple(h.shape), (0,), spec, 1)
    proto = onnx.ModelProto()
    from mq_deploy.export.graph import OPSET, _Builder

    b = _Builder(OPSET, proto.graph.initializer)
    q, s = state_codec.emit_encode(b, si, "value", {})
    for name, t in (("q", q), ("s", s)):
        if t is not None:
            b.nodes.append(helper.make_node("Identity", [t], [name]))
    proto.graph.node.extend(b.nodes)
    proto.graph.input.append(helper.make_tensor_value_info("value", TensorProto.FLOAT, None))
    proto.graph.output.append(helper.make_tensor_value_info("q", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                            None))
    if s is not None:
        proto.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT16, None))
    proto.opset_import.append(helper.make_opsetid("", OPSET))
    proto.ir_version = 10
    got = ort_session(proto.SerializeToString()).run(None, {"value": h.numpy()})
    want = state_codec.encode(0, [spec] + ([StateSpec("ssm_state_scale", (8,), scale_of="ssm_state")]
                                                 if dtype == "int8" else []), (h,), {})
    print("codes differing:", int((got[0] != want[0].numpy()).sum()))
    assert got[0].dtype == want[0].numpy().dtype
    np.testing.assert_array_equal(got[0], want[0].numpy())
    if dtype == "int8":
        np.testing.assert_array_equal(got[1], want[1].numpy())
        assert got[1].dtype == np.float16
        assert (got[0][0, 0] == 0).all() and (got[0][1, 0] == -127).all()
        back = state_codec.decode(0, [spec, StateSpec("ssm_state_scale", (8,), scale_of="ssm_state")],
                                  (want[0], want[1]), {})[0]
        amax, s = h.abs().amax(-1).double(), want[1].double()
        inside = amax <= 127 * state_codec.SCALE_MAX
        assert (s[inside] >= amax[inside] / 127).all()          # no code of a row in range clips
        assert (s <= amax / 127 * (1 + 2 ** -9) + 2 ** -23).all()
        assert s[0, 0] == state_codec.SCALE_MIN
        err = (back - h).abs().double()
        assert (err <= 0.5 * s.unsqueeze(-1) * (1 + 1e-6))[inside].all()
        rel = (err.amax(-1)[inside] / amax[inside].clamp_min(2 ** -20)).max().item()
        print(f"worst error / row max, rows in range: {rel:.2e}")
        # past the range (1e30): the row saturates (QuantizeLinear's [-128, 127]) on the largest scale
        assert got[0][0, 2, 0] == -128 and got[0][0, 2, -1] == 127 and back[0, 2, -1] == 127 * state_codec.SCALE_MAX


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """W8A8 (mambaquant) checkpoints of both LM samples, on 4 calibration windows."""
    root = tmp_path_factory.mktemp("stq")
    out = {}
    for which, path in SAMPLES.items():
        out[which] = str(root / which)
        assert main(["quantize", path, "-o", out[which], "--calib-samples", "4", "--seq-len", "128"]) == 0
    return out


CONV_SCALE = 0.02         # the float models' conv state grid in these tests (some codes saturate: an edge too)


def _float_model(which, tmp_path, dtype):
    """A float LM (an LM sample, or a transformers-written Nemotron-H hybrid: Mamba2 + attention + MLP) storing
    its decode states as `dtype`. A float model has no conv1d scale of its own: int8 gets CONV_SCALE, which
    export never does (it refuses int8 on a float model); the graph and the reference then round alike."""
    from mq_deploy.models.loaders import load_model
    from mq_deploy.models.points import mixer_prefix

    if which == "nemotron-h":
        pytest.importorskip("transformers")
        from test_hybrids import _nemotron

        _, path = _nemotron(tmp_path)
    else:
        path = SAMPLES[which]
    loaded = load_model(path)
    n = loaded.config.n_layer
    loaded.model.set_state_dtype(dtype, {mixer_prefix(i) + "conv1d": CONV_SCALE for i in range(n)})
    return loaded.model.eval(), loaded.model.cfg


def _decode_both(model, cfg, ids):
    """Per call, (logits, stored states) of the decode-step graph in ONNX Runtime and of the PyTorch reference,
    one token per call; both go on from the reference's states, so each call's rounding is compared alone."""
    from mq_deploy.export.graph import build_model

    sess = ort_session(build_model(model, step=True))
    layout = state_inputs(cfg)
    feeds, states = zero_states(cfg, ids.shape[0]), model.init_state(ids.shape[0])
    assert all(feeds[si.name].dtype == states[si.layers[0]][si.position].numpy().dtype for si in layout)
    got, want = [], []
    for t in range(ids.shape[1]):
        res = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"input_ids": ids[:, t:t + 1].numpy(), **feeds})))
        with torch.no_grad():
            logits, states = model(ids[:, t:t + 1], return_state=True, state=states)
        ref = {si.name: (torch.stack([states[i][si.position] for i in si.layers]) if si.spec.stacked
                         else states[si.layers[0]][si.position]).numpy() for si in layout}
        got.append((res["logits"], {si.name: res[si.output] for si in layout}))
        want.append((logits.numpy(), ref))
        feeds = ref
    return got, want, layout


@pytest.mark.parametrize("which", ["mamba1", "mamba2", "nemotron-h"])
@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_step_graph_matches_reference_storing_states_alike(tmp_path, which, dtype):
    model, cfg = _float_model(which, tmp_path, dtype)
    vocab = cfg.vocab_size
    ids = torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(1))
    got, want, layout = _decode_both(model, cfg, ids)
    assert {si.spec.dtype for si in layout if si.spec.int8_scale} == {dtype}
    worst_logits, off, total = 0.0, 0, 0
    for (gl, gs), (wl, ws) in zip(got, want):
        worst_logits = max(worst_logits, max_rel(gl, wl))
        for si in layout:
            assert gs[si.name].dtype == np.dtype(si.spec.dtype), si.name
            if si.spec.dtype == "int8":
                diff = np.abs(gs[si.name].astype(np.int32) - ws[si.name].astype(np.int32))
                assert diff.max() <= 1, si.name
                off, total = off + int((diff > 0).sum()), total + diff.size
            else:
                # float16: a tie moved by float32 noise rounds one unit of its last place away (2^-10 relative)
                assert max_rel(gs[si.name].astype(np.float32), ws[si.name].astype(np.float32)) <= 2 ** -10, si.name
    print(f"{which} {dtype}: logits max rel {worst_logits:.2e}; int8 codes off by one: {off} of {total}")
    assert worst_logits <= 1e-4
    assert off <= 0.01 * max(total, 1)


@pytest.mark.parametrize("which,least", [("mamba1", 3.5), ("mamba2", 3.5)])
def test_state_bytes_per_sequence(quantized, which, least):
    from mq_deploy.quant.qcheckpoint import load

    loaded = load(quantized[which])

    def nbytes(dtype):
        if dtype != "float32":
            from mq_deploy.export.exporter import quant_spec, set_state_dtype

            set_state_dtype(loaded, dtype, quant_spec(loaded))
        return sum(a.nbytes for a in zero_states(loaded.config, 1).values())

    f32 = nbytes("float32")
    f16, i8 = nbytes("float16"), nbytes("int8")
    print(f"{which}: float32 {f32} B, float16 {f16} B ({f32 / f16:.2f}x), int8 {i8} B ({f32 / i8:.2f}x)")
    assert f32 / f16 == 2
    assert f32 / i8 >= least


def test_cli_int8_states_verify_and_generate(quantized, tmp_path, capsys):
    onnx_path = str(tmp_path / "m1_int8.onnx")
    assert main(["export", quantized["mamba1"], "-o", onnx_path, "--decode-step", "--state-dtype", "int8"]) == 0
    assert main(["verify", onnx_path, "--reference", quantized["mamba1"], "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out
    assert main(["generate", onnx_path, "--prompt", "And God said", "--max-new-tokens", "16"]) == 0
    assert len(capsys.readouterr().out.strip()) > len("And God said")


def test_bad_state_dtype_inputs(quantized, tmp_path, capsys):
    out = str(tmp_path / "x.onnx")
    assert_user_error(capsys, ["export", SAMPLES["mamba1"], "-o", out, "--decode-step", "--state-dtype", "int8"],
                      "int8 decode states need")
    assert_user_error(capsys, ["export", quantized["mamba1"], "-o", out, "--state-dtype", "int8"], "--decode-step")
    assert_user_error(capsys, ["export", "samples/vim-fashion-mnist", "-o", out, "--decode-step",
                               "--state-dtype", "fp16"], "")
    step = str(tmp_path / "s.onnx")
    assert main(["export", quantized["mamba2"], "-o", step, "--decode-step", "--state-dtype", "int8"]) == 0
    from mq_deploy.backends.base import open_runner

    runner = open_runner(step)
    cfg = runner.artifact.config
    assert cfg.state_dtype == "int8"
    feeds = {"input_ids": np.zeros((1, 1), np.int64), **zero_states(cfg, 1)}
    runner.infer(feeds)                                    # the right feeds run
    from mq_deploy.errors import MQUserError

    for name, bad in (("ssm_state", feeds["ssm_state"].astype(np.float32)),
                      ("ssm_state_scale", feeds["ssm_state_scale"][..., :-1]),
                      ("conv_state", feeds["conv_state"][:-1])):
        with pytest.raises(MQUserError) as e:
            runner.infer({**feeds, name: bad})
        msg = str(e.value)
        print(msg)
        assert name in msg and "\n" not in msg


def test_the_cli_offers_every_state_dtype_the_config_takes():
    from mq_deploy.cli.main import STATE_DTYPE_NAMES

    assert tuple(STATE_DTYPE_NAMES.values()) == STATE_DTYPES
