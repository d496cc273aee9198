"""mq::SelectiveStateUpdateInt8State and mq::SSDStateUpdateInt8State: the fused Mamba1 / Mamba2 step ops reading
and writing their layer's int8 decode states (`export --decode-step --state-dtype int8`), with the states' decoding
and encoding inside the op (issue 23).

1. The kernel alone (one node) against the int8 op it wraps: the same inputs, with the states decoded as the rule
   says (models.state_codec: q * s) fed to mq::SelectiveStateUpdate / mq::SSDStateUpdate natively, whose outputs
   are then encoded by the rule's PyTorch form. Equal bit for bit (codes, float16 scales, y): the same kernel
   computes in between, and the codec is exact (test_state_codec_native.py). Mamba1 over test_state_update's
   specialisations (d_conv 4 and others, d_state 16 and 7 / 8 / 64 / 256, L <= 8 and L > 8, serial and
   thread-pool paths, where each scan task converts its own rows), Mamba2 over test_native_ssd's update shapes
   (per-tensor and per-channel scales, d_state 16 / 64 / 128, past the chunk), with states that reach the edges:
   -128 codes, an all-zero row, rows at the largest scale (65504) and at float16 subnormal scales. Mamba2's
   function body too, against its native op: within test_native_ssd's tolerance on y and the decoded state
   (the body's scan is not the native one), codes within one step.
2. The exported W8A8 step graphs (a Mamba1 test model, the Mamba2 and hybrid samples): one int8-state op per SSM
   layer and no conversion nodes around the states, equal bit for bit to the graph that converts its states
   with nodes around the int8 ops (what export wrote before), natively and through the function bodies, over
   calls that feed each other's states.
3. Bad input: a row-scale input of the wrong shape is one ORT error naming it; an edited int8-state node (a NaN
   conv_scale, a layer past the stacked states (a hybrid's: its SSM layers), a scale attribute removed) is one
   line when the file is opened, whichever path would run it (the runner's check_mq_nodes).
4. The float scratch the int8-state ops keep between calls (state_codec.h ScratchCache): one session run from 4
   threads at once, batch sizes differing, each call's outputs equal to the same call alone."""

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


@pytest.fixture(scope="module", params=["mamba1", "mamba2", "hybrid"])
def w8a8(request, tmp_path_factory):
    """(W8A8 model storing int8 states, its QuantSpec, its SSM layers): a small Mamba1 test model, the Mamba2 and
    hybrid (Mamba2 + attention) LM samples, quantized on 4 calibration windows."""
    if request.param == "mamba1":
        from test_state_update import _quantized

        torch.manual_seed(0)
        m = small_lm(vocab=256, d_model=64, d_model2=64, n_layer=2)
        spec = _quantized(m)
        m.set_state_dtype("int8", spec.act_scales)
        return m, spec, m.cfg.n_layer
    from mq_deploy.cli.main import main
    from mq_deploy.export.exporter import quant_spec, set_state_dtype
    from mq_deploy.families import state_inputs
    from mq_deploy.quant.qcheckpoint import load

    out = str(tmp_path_factory.mktemp("w8a8") / request.param)
    assert main(["quantize", f"samples/{request.param}-byte-lm", "-o", out, "--calib-samples", "4",
                 "--seq-len", "128"]) == 0
    loaded = load(out)
    spec = quant_spec(loaded)
    set_state_dtype(loaded, "int8", spec)
    ssm = next(si for si in state_inputs(loaded.model.cfg) if si.name == "ssm_state")
    return loaded.model, spec, len(ssm.layers)


def _update_ops():
    from mq_deploy.export import ssd_state_update_op as su
    from mq_deploy.export import state_update_op as mu

    return {mu.OP_UPDATE, su.OP_UPDATE}, {mu.OP_UPDATE_INT8_STATE, su.OP_UPDATE_INT8_STATE}


def test_step_graph_has_no_state_conversion_nodes(w8a8):
    from mq_deploy.export.graph import build_model

    m, spec, n_ssm = w8a8
    plain_ops, int8_ops = _update_ops()
    ops = [n.op_type for n in build_model(m, spec, step=True).graph.node]
    assert sum(ops.count(o) for o in int8_ops) == n_ssm and not plain_ops & set(ops)
    assert not {"ReduceMax", "Abs"} & set(ops), sorted(set(ops))
    unfused = [n.op_type for n in build_model(m, spec, step=True, fused_step=False).graph.node]
    assert "ReduceMax" in unfused and not int8_ops & set(unfused)


@pytest.mark.parametrize("lib", [pytest.param(True, marks=needs_lib), False], ids=["native", "body"])
@pytest.mark.parametrize("b,L", [(1, 1), (3, 1), (2, 9)])
def test_int8_state_graph_equals_the_converting_graph(w8a8, lib, b, L):
    """The graph export wrote before the op took int8 states: its fused int8 ops between converting nodes
    (build_model's int8_state_in_op=False). Several calls in a row, each fed the states the last one stored."""
    from mq_deploy.export import graph
    from mq_deploy.families import zero_states

    m, spec, _ = w8a8
    fused = _session(graph.build_model(m, spec, step=True), lib)
    before = graph.build_model(m, spec, step=True, int8_state_in_op=False)
    assert "ReduceMax" in [n.op_type for n in before.graph.node]
    before = _session(before, lib)
    rng = np.random.default_rng(b * 10 + L)
    names = [i.name for i in fused.get_inputs()][1:]
    feeds = zero_states(m.cfg, b)
    for t in range(4):
        ids = {"input_ids": rng.integers(0, m.cfg.vocab_size, (b, L if t == 0 else 1)).astype(np.int64)}
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


# ---- Mamba2: mq::SSDStateUpdateInt8State ------------------------------------------------------------------

def _ssd_int8_model(H, P, G, N, K, n_layer, layer, attrs, body):
    """One mq::SSDStateUpdateInt8State node, every input a graph input, with or without its function body."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export import ssd_op
    from mq_deploy.export import ssd_state_update_op as su
    from mq_deploy.export.scan_op import DOMAIN
    from mq_deploy.families.mamba2.config import Mamba2Config

    cfg = Mamba2Config(d_model=8, d_inner=H * P, head_dim=P, n_groups=G, d_state=N, d_conv=K)
    Cd = cfg.conv_dim
    node = h.make_node(su.OP_UPDATE_INT8_STATE, list(su.INPUTS_INT8_STATE), list(su.OUTPUTS_INT8_STATE),
                       domain=DOMAIN, layer=layer, **attrs)
    shapes = dict(xbc=(T.FLOAT, ["b", "L", Cd]), dt=(T.INT8, ["b", "L", H]),
                  conv_state=(T.INT8, [n_layer, "b", Cd, K - 1]), ssm_state=(T.INT8, [n_layer, "b", H, P, N]),
                  conv_w=(T.FLOAT, [Cd, K]), conv_b=(T.FLOAT, [Cd]), A=(T.FLOAT, [H]), D=(T.FLOAT, [H]),
                  dt_bias=(T.FLOAT, [H]), ssm_state_scale=(T.FLOAT16, [n_layer, "b", H, P]))
    graph = h.make_graph([node], "update", [h.make_tensor_value_info(k, *shapes[k]) for k in su.INPUTS_INT8_STATE],
                         [h.make_tensor_value_info("y", T.FLOAT, ["b", "L", H * P]),
                          h.make_tensor_value_info("conv_state_out", T.INT8, ["b", Cd, K - 1]),
                          h.make_tensor_value_info("ssm_state_out", T.INT8, ["b", H, P, N]),
                          h.make_tensor_value_info("ssm_state_scale_out", T.FLOAT16, ["b", H, P])])
    fns = [su.ssd_state_update_function(cfg, True, 21, int8_state=True), ssd_op.ssd_scan_function(21)]
    return h.make_model(graph, functions=fns if body else [],
                        opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)], ir_version=10)


@needs_lib
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("shape", [(1, 1, 4, 12, 2, 16), (3, 1, 2, 80, 1, 128), (2, 5, 6, 12, 3, 64),
                                   (1, 37, 2, 12, 1, 16), (2, 1, 24, 64, 1, 16)],
                         ids=lambda s: "b%d-L%d-H%d-P%d-G%d-N%d" % s)
def test_ssd_kernel_equals_the_int8_op_between_the_codec(shape, per_channel):
    from test_native_ssd import check_apart, update_case, update_model

    b, L, H, P, G, N = shape
    f, attrs, _, big = update_case(*shape, quant=True, per_channel=per_channel, seed=sum(shape))
    cs = np.float32(attrs["conv_scale"])
    conv_q = np.clip(np.rint(f["conv_state"] / cs), -128, 127).astype(np.int8)     # the states lie on the grid
    conv_q.reshape(-1)[::5] = -128
    h = torch.from_numpy(f["ssm_state"]) * torch.exp(torch.randn(f["ssm_state"].shape[:-1],
                                                                 generator=torch.Generator().manual_seed(7)) * 3)[..., None]
    rows = h.view(-1, N)
    rows[0], rows[1], rows[2] = 0, torch.linspace(-1, 1, N) * 127 * 65504, torch.linspace(-1, 1, N) * 127 * 2.0 ** -20
    ssm_q, ssm_s = state_codec.rows_int8(h)
    plain = dict(f, conv_state=conv_q.astype(np.float32) * cs,
                 ssm_state=(ssm_q.float() * ssm_s.float().unsqueeze(-1)).numpy())
    y, conv_out, h_out = _session_bytes(update_model(H, P, G, N, 4, 3, 1, True, attrs, body=False)).run(None, plain)
    mine = dict(f, conv_state=conv_q, ssm_state=ssm_q.numpy(), ssm_state_scale=ssm_s.numpy())
    got = _session(_ssd_int8_model(H, P, G, N, 4, 3, 1, attrs, body=False), True).run(None, mine)
    want_q, want_s = state_codec.rows_int8(torch.from_numpy(h_out))
    np.testing.assert_array_equal(got[0], y)
    np.testing.assert_array_equal(got[1], np.clip(np.rint(conv_out / cs), -128, 127).astype(np.int8))
    np.testing.assert_array_equal(got[2], want_q.numpy())
    np.testing.assert_array_equal(got[3].view(np.uint16), want_s.numpy().view(np.uint16))
    s = ssm_s.float()
    assert (conv_q == -128).any() and (ssm_q == 0).all(-1).any() and (s == 65504).any() and (s < 2 ** -14).any()
    # the function body against the native op: its scan is the body's own (test_native_ssd's tolerance)
    body = _session(_ssd_int8_model(H, P, G, N, 4, 3, 1, attrs, body=True), False).run(None, mine)
    check_apart(body[0], got[0], big.repeat_interleave(P), "y, body vs native", 2)
    dec = [q.astype(np.float32) * sc.astype(np.float32)[..., None] for q, sc in ((body[2], body[3]), (got[2], got[3]))]
    check_apart(dec[0], dec[1], big, "decoded ssm_state_out, body vs native", 1)
    np.testing.assert_array_equal(body[1], got[1])
    assert np.abs(body[2].astype(int) - got[2].astype(int)).max() <= 1


def _session_bytes(model_bytes):
    import onnxruntime as ort

    from helpers import ort_session

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(LIB)
    return ort_session(model_bytes, so)


@needs_lib
@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_concurrent_runs_share_the_kept_scratch_safely(family):
    from concurrent.futures import ThreadPoolExecutor

    def case(b):
        if family == "mamba1":
            f, attrs = _update_inputs(b, 1, 70, 16, 5, 4, False, True, seed=b)
            conv_q, ssm_q, ssm_s = _int8_states(f, attrs, seed=b + 1)
            mine = dict(f, conv_state=conv_q, ssm_state=ssm_q, ssm_state_scale=ssm_s)
            return attrs, {k: v.numpy() for k, v in mine.items()}
        from test_native_ssd import update_case

        f, attrs, _, _ = update_case(b, 1, 4, 12, 2, 16, quant=True, seed=b)
        cs = np.float32(attrs["conv_scale"])
        q, sc = state_codec.rows_int8(torch.from_numpy(f["ssm_state"]))
        return attrs, dict(f, conv_state=np.clip(np.rint(f["conv_state"] / cs), -128, 127).astype(np.int8),
                           ssm_state=q.numpy(), ssm_state_scale=sc.numpy())

    cases = [case(b) for b in (1, 2, 3, 5)]
    attrs = cases[0][0]
    if family == "mamba1":     # one model for every batch: the inputs' batch dimension left open
        shapes = {k: ["b" if (k in ("conv_state", "ssm_state", "ssm_state_scale") and i == 1) or
                      (k in ("x", "z") and i == 0) else d for i, d in enumerate(v.shape)]
                  for k, v in cases[0][1].items()}
        for _, feeds in cases:   # the same weights for every batch
            for k in ("conv_w", "conv_b", "x_proj_w", "x_proj_scale", "dt_proj_w", "dt_proj_scale", "delta_bias",
                      "A", "D", "gate_scale"):
                feeds[k] = cases[0][1][k]
        sess = _session(_int8_model(shapes, attrs), True)
    else:
        for _, feeds in cases:
            for k in ("conv_w", "conv_b", "A", "D", "dt_bias"):
                feeds[k] = cases[0][1][k]
        sess = _session(_ssd_int8_model(4, 12, 2, 16, 4, 3, 1, attrs, body=False), True)
    alone = [sess.run(None, feeds) for _, feeds in cases]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            together = list(pool.map(lambda f: sess.run(None, f), [feeds for _, feeds in cases]))
            for got, want in zip(together, alone):
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("edit", ["conv_scale NaN", "layer 99", "x_scale missing"])
def test_an_edited_int8_state_node_is_one_line(w8a8, edit):
    from onnx import helper

    from mq_deploy.backends.ort.runner import check_mq_nodes
    from mq_deploy.errors import MQUserError
    from mq_deploy.export.graph import build_model

    m, spec, n_ssm = w8a8
    proto = build_model(m, spec, step=True)
    check_mq_nodes(proto, "model.onnx", m.cfg)                     # as exported: accepted
    _, int8_ops = _update_ops()
    node = next(n for n in proto.graph.node if n.op_type in int8_ops)
    name, value = {"conv_scale NaN": ("conv_scale", float("nan")), "layer 99": ("layer", 99),
                   "x_scale missing": ("x_scale", None)}[edit]
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))
    with pytest.raises(MQUserError) as e:
        check_mq_nodes(proto, "model.onnx", m.cfg)
    print(e.value)
    assert "\n" not in str(e.value) and node.op_type in str(e.value) and name in str(e.value)
    if name == "layer":     # the limit is the stacked states' own layers (a hybrid's SSM layers), not n_layer
        assert f"outside the {n_ssm} stacked layers" in str(e.value)
