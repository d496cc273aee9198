"""The native int8 state codec (plugins/selective_scan/ort/state_codec.cpp), which the fused step ops with int8
states run inside their kernels, against the rounding rule's PyTorch form (models.state_codec, itself tested
equal to the ONNX nodes in test_state_dtype.py), through the library's test entry points (ctypes):

- float -> float16 on every float16 value, every midpoint between neighbours (ties: to even), the values just
  beside them, the overflow edge (65504 / 65520) and subnormals, NaN and infinities: equal to numpy's cast,
  bit for bit; float16 -> float on all 65536 bit patterns: equal to numpy's;
- the row rule on the rows of test_state_dtype's edge cases (all zero, ties, past the float16 scale's range,
  tiny, amax at float16's binade edges and in its subnormals) and on random rows of 16, 128 and 7 values (the
  AVX-512 path's whole vectors and its scalar tail), by the fast form and the plain loops (_ref): codes and
  scales equal to the PyTorch rule's, and decoding equal to q * s;
- rows with infinities and huge values: equal to the ONNX nodes (models.state_codec.rows_encode_nodes), which
  the ops' function bodies run; rows with NaN (a step whose logits are NaN, where generation stops), where the
  PyTorch rule lets NaN spread and ONNX Runtime's ReduceMax depends on the NaN's place: NaN is passed over
  (the row's scale and other codes as without it) and its code is -128 (QuantizeLinear's);
- rows of exact ties (every value an odd multiple of half its row's scale) and of values one float32 step beside
  them, where the fast form's multiply by the reciprocal must hand over to the division: equal to the rule;
- the grid rule (the conv state on its static scale): equal to QuantizeLinear's rounding of v / s."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from test_state_dtype import _edge_rows

from mq_deploy.models import state_codec


@pytest.fixture(scope="module")
def lib():
    from mq_deploy.ops.native import ort_library

    path = ort_library()
    if path is None:
        pytest.skip("the native library is not built")
    lib = ctypes.CDLL(path)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name, args in (("mq_state_rows_encode", [ptr, i64, i64, ptr, ptr]),
                       ("mq_state_rows_decode", [ptr, ptr, i64, i64, ptr]),
                       ("mq_state_rows_encode_ref", [ptr, i64, i64, ptr, ptr]),
                       ("mq_state_rows_decode_ref", [ptr, ptr, i64, i64, ptr]),
                       ("mq_state_grid_encode", [ptr, i64, ctypes.c_float, ptr]),
                       ("mq_half_from_float", [ptr, i64, ptr]), ("mq_float_from_half", [ptr, i64, ptr])):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def _p(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def test_half_conversions_bit_exact(lib):
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = np.empty(bits.size, np.float32)
    lib.mq_float_from_half(_p(bits), bits.size, _p(got))
    finite = np.isfinite(want)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.isnan(got[~finite]).sum() == np.isnan(want[~finite]).sum()

    halves = want[finite & (bits < 0x7c00)].astype(np.float64)       # 0 .. 65504, positive
    halves = np.unique(halves)
    mids = (halves[:-1] + halves[1:]) / 2                             # exact in float32: ties
    v = np.concatenate([halves, mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20), [65504, 65519.99, 65520, 65536,
                                                                                      1e6, 2 ** -25, 2 ** -26, 1e-30]])
    v = v.astype(np.float32)
    v = np.concatenate([v, -v, np.float32([np.inf, -np.inf, np.nan])])
    rng = np.random.default_rng(0)
    v = np.concatenate([v, (rng.standard_normal(100000) * 10.0 ** rng.uniform(-9, 6, 100000)).astype(np.float32)])
    got = np.empty(v.size, np.uint16)
    lib.mq_half_from_float(_p(v), v.size, _p(got))
    with np.errstate(over="ignore"):
        want = v.astype(np.float16).view(np.uint16)
    nan = np.isnan(v)
    print("halves differing:", int((got[~nan] != want[~nan]).sum()), "of", int((~nan).sum()))
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


def _encode(lib, flat, ref):
    n_rows, n = flat.shape
    q = np.empty(flat.shape, np.int8)
    s = np.empty(n_rows, np.uint16)
    (lib.mq_state_rows_encode_ref if ref else lib.mq_state_rows_encode)(_p(flat), n_rows, n, _p(q), _p(s))
    return q, s


@pytest.mark.parametrize("ref", [False, True], ids=["fast", "ref"])
@pytest.mark.parametrize("rows", ["edges", "random16", "random128", "random7"])
def test_rows_rule_equals_pytorch(lib, rows, ref):
    if rows == "edges":
        h = _edge_rows()
    else:
        n = int(rows[len("random"):])
        g = torch.Generator().manual_seed(n)
        h = torch.randn(64, n, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 6)
    q_want, s_want = state_codec.rows_int8(h)
    flat = np.ascontiguousarray(h.numpy().reshape(-1, h.shape[-1]), np.float32)
    n_rows, n = flat.shape
    q, s = _encode(lib, flat, ref)
    print(rows, "codes differing:", int((q != q_want.numpy().reshape(q.shape)).sum()))
    assert np.array_equal(q, q_want.numpy().reshape(q.shape))
    assert np.array_equal(s, s_want.numpy().reshape(-1).view(np.uint16))
    back = np.empty(flat.shape, np.float32)
    (lib.mq_state_rows_decode_ref if ref else lib.mq_state_rows_decode)(_p(q), _p(s), n_rows, n, _p(back))
    want = q.astype(np.float32) * s.view(np.float16).astype(np.float32)[:, None]
    assert np.array_equal(back, want)


@pytest.mark.parametrize("n", [16, 128])
def test_rows_of_exact_ties_and_near_ties(lib, n):
    """Rows whose values divided by their scale are exact half-integers (ties: to even), and values a few float32
    steps beside them: the fast form multiplies by the scale's reciprocal and must take the division there."""
    rng = np.random.default_rng(n)
    amax = (10.0 ** rng.uniform(-6, 6, 256)).astype(np.float32)
    _, s16 = state_codec.rows_int8(torch.from_numpy(amax[:, None]))       # each row's scale, from its amax
    s = s16.numpy().astype(np.float32)
    k = rng.integers(-127, 127, (256, n)).astype(np.float32) + 0.5
    h = (k * s[:, None]).astype(np.float32)                              # exact: an 11-bit scale, a 9-bit multiple
    h[:, 0] = amax
    h[:, 1] = -amax
    h[64:128, 2:] = np.nextafter(h[64:128, 2:], np.float32(np.inf))
    h[128:192, 2:] = np.nextafter(h[128:192, 2:], np.float32(-np.inf))
    assert np.array_equal(h[:64, 2:] / s[:64, None], k[:64, 2:])         # ties indeed
    q_want, s_want = state_codec.rows_int8(torch.from_numpy(h))
    for ref in (False, True):
        q, sc = _encode(lib, h, ref)
        np.testing.assert_array_equal(sc, s_want.numpy().view(np.uint16))
        np.testing.assert_array_equal(q, q_want.numpy())


def test_grid_rule_equals_quantize_linear(lib):
    scale = np.float32(0.02)
    k = np.arange(-140, 141, dtype=np.float32)
    v = np.concatenate([k * scale, (k + 0.5) * scale, (k + 0.5) * scale * (1 + 2 ** -20), [1e9, -1e9, 0.0]])
    v = v.astype(np.float32)
    q = np.empty(v.size, np.int8)
    lib.mq_state_grid_encode(_p(v), v.size, scale, _p(q))
    want = np.clip(np.rint(v / scale), -128, 127).astype(np.int8)      # rint: half to even, as QuantizeLinear
    assert np.array_equal(q, want)


@pytest.mark.parametrize("ref", [False, True], ids=["fast", "ref"])
def test_rows_with_inf_equal_the_onnx_nodes_and_nan_is_passed_over(lib, ref):
    from onnx import TensorProto, helper, numpy_helper

    from helpers import ort_session

    nodes, consts = [], []

    def op(op_type, inputs, **attrs):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(a):
        consts.append(numpy_helper.from_array(a, f"c{len(consts)}"))
        return consts[-1].name

    q, s = state_codec.rows_encode_nodes(op, const, "h")    # the function bodies' nodes
    graph = helper.make_graph(nodes, "codec", [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(q, TensorProto.INT8, None),
                               helper.make_tensor_value_info(s, TensorProto.FLOAT16, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    rng = np.random.default_rng(1)
    for n in (16, 7, 40):
        h = rng.standard_normal((6, n)).astype(np.float32)
        h[2, 5] = np.inf
        h[3, 0], h[3, 1] = -np.inf, np.inf
        h[4, 2] = 1e30
        want_q, want_s = ort_session(model.SerializeToString()).run(None, {"h": h})
        got_q, got_s = _encode(lib, h, ref)
        np.testing.assert_array_equal(got_q, want_q)
        np.testing.assert_array_equal(got_s, want_s.view(np.uint16))
        nan = h.copy()
        nan[0, 3], nan[1, :], nan[5, 0], nan[4, -1] = np.nan, np.nan, np.nan, np.nan
        got_q, got_s = _encode(lib, nan, ref)
        without = _encode(lib, np.where(np.isnan(nan), 0, nan).astype(np.float32), ref)
        assert (got_q[np.isnan(nan)] == -128).all()
        np.testing.assert_array_equal(got_q[~np.isnan(nan)], without[0][~np.isnan(nan)])
        np.testing.assert_array_equal(got_s, without[1])
