"""The mq::SelectiveScan function body runs in ONNX Runtime with no plugin and equals selective_scan_ref.

Tolerance 2e-5 relative: float32 on both sides, different evaluation order (the fast-vs-reference
tolerance of test_selective_scan).
"""

import numpy as np
import pytest
import torch

from mq_deploy.ops.selective_scan import selective_scan_ref

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def model_with_scan_node():
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export.scan_op import DOMAIN, INPUTS, OP, OUTPUTS, selective_scan_function

    shapes = dict(x=["b", "L", "d"], delta=["b", "L", "d"], A=["d", "n"], B=["b", "L", "n"], C=["b", "L", "n"],
                  D=["d"], z=["b", "L", "d"], delta_bias=["d"], h0=["b", "d", "n"])
    graph = h.make_graph([h.make_node(OP, list(INPUTS), list(OUTPUTS), domain=DOMAIN)], "scan",
                         [h.make_tensor_value_info(k, T.FLOAT, shapes[k]) for k in INPUTS],
                         [h.make_tensor_value_info("y", T.FLOAT, ["b", "L", "d"]),
                          h.make_tensor_value_info("h_last", T.FLOAT, ["b", "d", "n"])])
    m = h.make_model(graph, functions=[selective_scan_function(21)],
                     opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("shape", [(1, 1, 8, 16), (2, 37, 24, 16), (3, 5, 7, 64)])
def test_function_body_in_onnxruntime_matches_reference(shape):
    b, L, d, n = shape
    r = np.random.default_rng(0)
    feeds = dict(x=r.standard_normal((b, L, d)), delta=r.standard_normal((b, L, d)) * 0.5, A=-r.random((d, n)) - 0.1,
                 B=r.standard_normal((b, L, n)), C=r.standard_normal((b, L, n)), D=r.standard_normal(d),
                 z=r.standard_normal((b, L, d)), delta_bias=r.standard_normal(d) * 0.3,
                 h0=r.standard_normal((b, d, n)))
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    sess = ort.InferenceSession(model_with_scan_node().SerializeToString(), providers=["CPUExecutionProvider"])
    y, h_last = sess.run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    y_ref, h_ref = selective_scan_ref(t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                      True, t["h0"], True)
    ey = float(np.abs(y - y_ref.numpy()).max() / np.abs(y_ref.numpy()).max())
    eh = float(np.abs(h_last - h_ref.numpy()).max() / np.abs(h_ref.numpy()).max())
    print(f"{shape}: y rel err {ey:.1e}, state rel err {eh:.1e}")
    assert ey < 2e-5 and eh < 2e-5
