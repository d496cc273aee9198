"""The mq::SelectiveScan function bodies run in ONNX Runtime with no plugin and equal the references.

Tolerance 2e-5 relative: float32 on both sides, different evaluation order (the fast-vs-reference
tolerance of test_selective_scan). The int8 form gets the same integers and scales as
selective_scan_int8_ref, so only the float32 recurrence differs.
"""

import numpy as np
import pytest
import torch

from mq_deploy.ops.quant import quantize
from mq_deploy.ops.selective_scan import selective_scan_int8_ref, selective_scan_ref

from helpers import ort_session

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SHAPES = dict(x=["b", "L", "d"], delta=["b", "L", "d"], A=["d", "n"], B=["b", "L", "n"], C=["b", "L", "n"],
              D=["d"], z=["b", "L", "d"], delta_bias=["d"], gate_scale=["d"], h0=["b", "d", "n"])


def model_with_scan_node(int8: bool, scales=None, out_dtype=1):
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export.scan_op import (
        DOMAIN,
        INPUTS,
        INT8_INPUTS,
        OP,
        OP_FLOAT,
        OUTPUTS,
        selective_scan_float_function,
        selective_scan_function,
    )

    attrs = {f"{k}_scale": float(v) for k, v in (scales or {}).items()}
    if out_dtype != 1:
        attrs["out_dtype"] = out_dtype
    node = h.make_node(OP if int8 else OP_FLOAT, list(INPUTS), list(OUTPUTS), domain=DOMAIN, **attrs)
    graph = h.make_graph([node], "scan",
                         [h.make_tensor_value_info(k, T.INT8 if int8 and k in INT8_INPUTS else T.FLOAT, SHAPES[k])
                          for k in INPUTS],
                         [h.make_tensor_value_info("y", out_dtype, ["b", "L", "d"]),
                          h.make_tensor_value_info("h_last", T.FLOAT, ["b", "d", "n"])])
    fn = selective_scan_function(21) if int8 else selective_scan_float_function(21)
    m = h.make_model(graph, functions=[fn], opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)],
                     ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return ort_session(m.SerializeToString())


def random_inputs(shape, seed=0, gate=False):
    b, L, d, n = shape
    r = np.random.default_rng(seed)
    feeds = dict(x=r.standard_normal((b, L, d)), delta=r.standard_normal((b, L, d)) * 0.5, A=-r.random((d, n)) - 0.1,
                 B=r.standard_normal((b, L, n)), C=r.standard_normal((b, L, n)), D=r.standard_normal(d),
                 z=r.standard_normal((b, L, d)), delta_bias=r.standard_normal(d) * 0.3,
                 gate_scale=(r.random(d) * 2 + 0.2) if gate else np.ones(d), h0=r.standard_normal((b, d, n)))
    return {k: v.astype(np.float32) for k, v in feeds.items()}


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("shape", [(1, 1, 8, 16), (2, 37, 24, 16), (3, 5, 7, 64)])
def test_float_body_matches_reference(shape):
    feeds = random_inputs(shape)
    y, h_last = model_with_scan_node(False).run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    # gate_scale all ones is exactly silu(z)
    y_ref, h_ref = selective_scan_ref(t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                      True, t["h0"], True)
    assert rel(y, y_ref.numpy()) < 2e-5 and rel(h_last, h_ref.numpy()) < 2e-5


@pytest.mark.parametrize("shape,gate", [((1, 1, 8, 16), False), ((2, 37, 24, 16), True), ((3, 5, 7, 64), True)])
def test_int8_body_matches_int8_reference(shape, gate):
    f = random_inputs(shape, seed=1, gate=gate)
    t = {k: torch.from_numpy(v) for k, v in f.items()}
    scales = {k: t[k].abs().max() / 127 for k in ("x", "delta", "B", "C", "z")}
    q = {k: quantize(t[k], s, 8) for k, s in scales.items()}
    feeds = dict(f, **{k: v.numpy() for k, v in q.items()})
    y, h_last = model_with_scan_node(True, scales).run(None, feeds)
    y_ref, h_ref = selective_scan_int8_ref(q["x"], scales["x"], q["delta"], scales["delta"], t["A"], q["B"],
                                           scales["B"], q["C"], scales["C"], t["D"], q["z"], scales["z"],
                                           t["delta_bias"], True, t["h0"], True,
                                           gate_scale=t["gate_scale"] if gate else None)
    assert rel(y, y_ref.numpy()) < 2e-5 and rel(h_last, h_ref.numpy()) < 2e-5
    # out_dtype = float16: the same values, rounded to half (relative 2^-11, plus the float32 tolerance)
    y16, _ = model_with_scan_node(True, scales, out_dtype=10).run(None, feeds)
    assert y16.dtype == np.float16 and rel(y16.astype(np.float32), y_ref.numpy()) < 1e-3
