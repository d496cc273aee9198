"""mq::SelectiveStateUpdateInt8State: the fused Mamba1 step op reading and writing its layer's int8 decode states
(`export --decode-step --state-dtype int8`), with their decoding and encoding inside the op (issue 23).

1. The kernel alone (one node, no function body) against the int8 op it wraps: the same inputs, with the states
   decoded as the rule says (models.state_codec: q * s) fed to mq::SelectiveStateUpdate, whose outputs are then
   encoded by the rule's PyTorch form. Equal bit for bit (codes, float16 scales, y): the same kernel computes in
   between, and the codec is exact (test_state_codec_native.py). Over test_state_update's specialisations (d_conv
   4 and others, d_state 16 and 7 / 8 / 64 / 256, L <= 8 and L > 8, serial and thread-pool paths, the codec's
   serial and per-sequence tasks) with states that reach the edges: -128 codes, an all-zero row, rows at the
   largest scale (65504) and at float16 subnormal scales.
2. The exported W8A8 step graph: one int8-state op per layer and no conversion nodes around the states, equal
   bit for bit to the graph that converts its states with nodes around the float ops (fused_step=False keeps the
   unfused ops; the same fused float ops between converting nodes is what export wrote before), natively and
   through the function bodies.
3. Bad input: a row-scale input of the wrong shape is one ORT error naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_state_update import KERNEL_CASES, _session, _update_inputs, _update_model

from mq_deploy.models import state_codec

from helpers import ort_lib_marker, small_lm

onnx = pytest.importorskip("onnx")
LIB, needs_lib = ort_lib_marker()


def _int8_model(shapes, attrs):
    """One mq::SelectiveStateUpdateInt8State node, every input a graph input (the library must run it)."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export.scan_op import DOMAIN
    from mq_deploy.export.state_update_op import INPUTS_INT8_STATE, OP_UPDATE_INT8_STATE, OUTPUTS_INT8_STATE

    types = {"z": T.INT8, "x_proj_w": T.INT8, "dt_proj_w": T.INT8, "conv_state": T.INT8, "ssm_state": T.INT8,
             "ssm_state_scale": T.FLOAT16}
    node = h.make_node(OP_UPDATE_INT8_STATE, list(INPUTS_INT8_STATE), list(OUTPUTS_INT8_STATE), domain=DOMAIN,
                       **attrs)
    graph = h.make_graph([node], "update", [h.make_tensor_value_info(k, types.get(k, T.FLOAT), shapes[k])
                                            for k in INPUTS_INT8_STATE],
                         [h.make_tensor_value_info(k, t, None)
                          for k, t in zip(OUTPUTS_INT8_STATE, (T.FLOAT, T.INT8, T.INT8, T.FLOAT16))])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)], ir_version=10)


def _int8_states(f, attrs, seed):
    """f's float states as int8: the conv state on conv_scale's grid (codes with -128), the SSM state as codes and
    float16 row scales with the edges (an all-zero row, the largest scale, subnormal scales)."""
    g = torch.Generator().manual_seed(seed)
    conv_q = torch.randint(-128, 128, f["conv_state"].shape, dtype=torch.int8, generator=g)
    conv_q.view(-1)[::7] = -128
    h = f["ssm_state"] * torch.exp(torch.randn(f["ssm_state"].shape[:-1], generator=g) * 3).unsqueeze(-1)
    rows = h.view(-1, h.shape[-1])
    rows[0] = 0
    rows[1] = torch.linspace(-1, 1, h.shape[-1]) * 127 * 65504
    rows[2] = torch.linspace(-1, 1, h.shape[-1]) * 127 * 2.0 ** -20
    q, s = state_codec.rows_int8(h)
    return conv_q, q, s


@needs_lib
@pytest.mark.parametrize("case", KERNEL_CASES + [(3, 1, 832, 16, 52, 4, False)],
                         ids=lambda c: "b%d-L%d-Di%d-N%d-R%d-K%d%s" % (*c[:6], "-falcon" * c[6]))
def test_kernel_equals_the_int8_op_between_the_codec(case):
    b, L, Di, N, R, K, falcon = case
    f, attrs = _update_inputs(b, L, Di, N, R, K, falcon, True, seed=sum(case[:6]))
    conv_q, ssm_q, ssm_s = _int8_states(f, attrs, seed=sum(case))
    cs = torch.tensor(attrs["conv_scale"], dtype=torch.float32)
    plain = dict(f, conv_state=conv_q.float() * cs, ssm_state=ssm_q.float() * ssm_s.float().unsqueeze(-1))
    ref = _session(_update_model(True, {k: list(v.shape) for k, v in plain.items()}, attrs), True).run(
        None, {k: v.numpy() for k, v in plain.items()})
    mine = dict(f, conv_state=conv_q, ssm_state=ssm_q, ssm_state_scale=ssm_s)
    got = _session(_int8_model({k: list(v.shape) for k, v in mine.items()}, attrs), True).run(
        None, {k: v.numpy() for k, v in mine.items()})
    y, conv_out, h_out = (torch.from_numpy(np.asarray(a)) for a in ref)
    want_conv = torch.round(conv_out / cs).clamp(-128, 127).to(torch.int8)
    want_q, want_s = state_codec.rows_int8(h_out)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int8 and got[2].dtype == np.int8
    assert got[3].dtype == np.float16 and got[3].shape == (b, Di)
    np.testing.assert_array_equal(got[0], y.numpy())
    np.testing.assert_array_equal(got[1], want_conv.numpy())
    np.testing.assert_array_equal(got[2], want_q.numpy())
    np.testing.assert_array_equal(got[3].view(np.uint16), want_s.numpy().view(np.uint16))
    s = ssm_s.float()      # the edges the inputs reached: an all-zero row, the largest scale, subnormal scales
    assert ((conv_q == -128).any() or not conv_q.numel()) and (ssm_q == 0).all(-1).any() and (s == 65504).any() and (s < 2 ** -14).any()


@pytest.fixture(scope="module")
def w8a8():
    from test_state_update import _quantized

    torch.manual_seed(0)
    m = small_lm(vocab=256, d_model=64, d_model2=64, n_layer=2)
    spec = _quantized(m)
    m.set_state_dtype("int8", spec.act_scales)
    return m, spec


def test_step_graph_has_no_state_conversion_nodes(w8a8):
    from mq_deploy.export.graph import build_model
    from mq_deploy.export.state_update_op import OP_UPDATE, OP_UPDATE_INT8_STATE

    m, spec = w8a8
    ops = [n.op_type for n in build_model(m, spec, step=True).graph.node]
    assert ops.count(OP_UPDATE_INT8_STATE) == m.cfg.n_layer and OP_UPDATE not in ops
    assert not {"ReduceMax", "Abs", "Cast"} & set(ops), sorted(set(ops))
    plain = [n.op_type for n in build_model(m, spec, step=True, fused_step=False).graph.node]
    assert "ReduceMax" in plain and OP_UPDATE_INT8_STATE not in plain


@pytest.mark.parametrize("lib", [pytest.param(True, marks=needs_lib), False], ids=["native", "body"])
@pytest.mark.parametrize("b,L", [(1, 1), (3, 1), (2, 9)])
def test_int8_state_graph_equals_the_converting_graph(w8a8, monkeypatch, lib, b, L):
    """The graph export wrote before the op took int8 states: its fused float ops between converting nodes
    (_int8_fused found empty). Several calls in a row, each fed the states the last one stored."""
    from mq_deploy.export import graph
    from mq_deploy.families import zero_states

    m, spec = w8a8
    fused = _session(graph.build_model(m, spec, step=True), lib)
    monkeypatch.setattr(graph, "_int8_fused", lambda *a: frozenset())
    before = graph.build_model(m, spec, step=True)
    assert "ReduceMax" in [n.op_type for n in before.graph.node]
    before = _session(before, lib)
    rng = np.random.default_rng(b * 10 + L)
    names = [i.name for i in fused.get_inputs()][1:]
    feeds = zero_states(m.cfg, b)
    for t in range(4):
        ids = {"input_ids": rng.integers(0, 256, (b, L if t == 0 else 1)).astype(np.int64)}
        got, want = fused.run(None, {**ids, **feeds}), before.run(None, {**ids, **feeds})
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
        feeds = dict(zip(names, got[1:]))
    assert feeds["ssm_state"].dtype == np.int8 and feeds["ssm_state_scale"].dtype == np.float16


@needs_lib
def test_a_bad_row_scale_shape_is_one_error():
    f, attrs = _update_inputs(1, 1, 70, 16, 5, 4, False, True, seed=3)
    conv_q, ssm_q, ssm_s = _int8_states(f, attrs, seed=4)
    mine = dict(f, conv_state=conv_q, ssm_state=ssm_q, ssm_state_scale=ssm_s[..., :-1])
    with pytest.raises(Exception, match=r"ssm_state_scale has shape \[2, 1, 69\], expected \[2, 1, 70\]"):
        _session(_int8_model({k: list(v.shape) for k, v in mine.items()}, attrs), True).run(
            None, {k: v.numpy() for k, v in mine.items()})
