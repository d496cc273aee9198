"""libmq_scan_ort.so: mq::SelectiveScan and mq::SelectiveScanFloat as ONNX Runtime custom ops, against
their function bodies, selective_scan_int8_ref and selective_scan_ref.

`pip install` builds the library into mq_deploy/_native/ (it needs no ONNX Runtime headers: the C API
subset it calls is declared in plugins/selective_scan/ort/mq_ort_api.h). It is looked up where
mq_deploy.ops.native.ort_library_path() says ($MQ_SCAN_ORT_LIB, else mq_deploy/_native/). Skipped when
it is not built, unless MQ_REQUIRE_NATIVE=1 (CI) or MQ_REQUIRE_ORT_LIB=1, which turn the skip into a
failure. With $ONNXRUNTIME_INCLUDE_DIR naming a folder with the real onnxruntime_c_api.h, the
declarations are also checked against it (test_abi_matches_the_real_header).

Tolerances, as rel_err (max |diff| / max |ref|):
  float32 y and h_last: 2e-5, the native-vs-reference bound of test_native_scan (same kernel): both
  sides compute in float32 from the same int8 codes and scales and differ only in summation order over
  N and in exp/softplus/sigmoid ulps (the kernel's exp2 polynomial vs libm), a few ulps per step that
  the decaying recurrence (A < 0) does not accumulate. The function body is float32 ONNX ops, the same
  bound again.
  float16 y: the float32 bound plus the final rounding to half (relative 2^-11): 1e-3.
"""

import json
import os

import numpy as np
import pytest
import torch

from mq_deploy.ops.selective_scan import selective_scan_int8_ref, selective_scan_ref

from conftest import REPO, rel_err
from helpers import ort_lib_marker, ort_session, with_edges

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

LIB, needs_lib = ort_lib_marker()

TOL = 2e-5
TOL_FP16 = 1e-3
SCALES = dict(x=0.02, delta=0.015, B=0.03, C=0.025, z=0.03)
DIMS = dict(x="bLd", delta="bLd", A="dn", B="bLn", C="bLn", D="d", z="bLd", delta_bias="d", gate_scale="d",
            h0="bdn")


def scan_model(out_dtype=1, body=True, scales=SCALES, attrs=None):
    """A model with one mq::SelectiveScan node (symbolic b, L, d, n), with or without its function body."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export.scan_op import DOMAIN, INPUTS, INT8_INPUTS, OP, OUTPUTS, selective_scan_function

    kw = {f"{k}_scale": float(v) for k, v in scales.items()}
    if out_dtype != 1:
        kw["out_dtype"] = out_dtype
    kw.update(attrs or {})
    node = h.make_node(OP, list(INPUTS), list(OUTPUTS), domain=DOMAIN, **kw)
    graph = h.make_graph([node], "scan",
                         [h.make_tensor_value_info(k, T.INT8 if k in INT8_INPUTS else T.FLOAT, list(DIMS[k]))
                          for k in INPUTS],
                         [h.make_tensor_value_info("y", out_dtype, list("bLd")),
                          h.make_tensor_value_info("h_last", T.FLOAT, list("bdn"))])
    m = h.make_model(graph, functions=[selective_scan_function(21)] if body else [],
                     opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)], ir_version=10)
    if body:
        onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()


def session(model, lib=True, threads=None, profile=False):
    so = ort.SessionOptions()
    if lib:
        so.register_custom_ops_library(LIB)
    if threads:
        so.intra_op_num_threads = threads
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mq_scan_ort_profile")
    return ort_session(model, so)


def feeds(b, L, d, n, gate=True, seed=0):
    """Fresh random int8 codes and float parameters (dt = softplus(.) spans ~0.05..3), as numpy."""
    g = torch.Generator().manual_seed(seed)

    def q(*s):
        return torch.randint(-127, 128, s, dtype=torch.int8, generator=g).numpy()

    f = dict(x=q(b, L, d), delta=q(b, L, d), A=-torch.rand(d, n, generator=g) * 2 - 0.05, B=q(b, L, n),
             C=q(b, L, n), D=torch.randn(d, generator=g), z=q(b, L, d),
             delta_bias=torch.randn(d, generator=g) * 0.5 - 1.0,
             gate_scale=torch.rand(d, generator=g) * 1.5 + 0.25 if gate else torch.ones(d),
             h0=torch.randn(b, d, n, generator=g))
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in f.items()}


def reference(f, gate=True):
    t = {k: torch.from_numpy(v) for k, v in f.items()}
    s = SCALES
    return selective_scan_int8_ref(t["x"], s["x"], t["delta"], s["delta"], t["A"], t["B"], s["B"], t["C"], s["C"],
                                   t["D"], t["z"], s["z"], t["delta_bias"], True, t["h0"], True,
                                   gate_scale=t["gate_scale"] if gate else None)


def check(got, want, tol, what):
    got, want = torch.from_numpy(np.asarray(got, dtype=np.float32)), torch.as_tensor(want, dtype=torch.float32)
    e = rel_err(got, want)
    print(f"{what}: rel err {e:.2e} (max |ref| {want.abs().max().item():.3g}, tol {tol:.0e})")
    assert e < tol


# (b, L, d, n): single step; d below, at and above the 32-channel task of the library and not a
# multiple of 16; b*L*d*N on both sides of its serial threshold (65536); N = 64 and the maximum 256
SHAPES = [(1, 1, 8, 16), (2, 37, 33, 16), (2, 300, 70, 16), (3, 5, 7, 64), (1, 40, 3, 256)]


@needs_lib
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gate", [False, True])
def test_matches_function_body_and_reference(shape, gate):
    f = feeds(*shape, gate=gate, seed=sum(shape))
    y, h_last = session(scan_model()).run(None, f)
    y_body, h_body = session(scan_model(), lib=False).run(None, f)
    y_ref, h_ref = reference(f, gate)
    assert y.dtype == np.float32 and y.shape == tuple(y_ref.shape) and h_last.shape == tuple(h_ref.shape)
    check(y, y_ref, TOL, "y vs int8 ref")
    check(h_last, h_ref, TOL, "h_last vs int8 ref")
    check(y, y_body, TOL, "y vs function body")
    check(h_last, h_body, TOL, "h_last vs function body")


_NAMES = dict(x="qx", delta="qdelta", B="qB", C="qC", z="qz", delta_bias="delta_bias")


def edge_feeds(b, L, d, n, seed):
    """feeds() with helpers.with_edges applied: -128 in every int8 input, delta_bias 24 on every third
    channel (delta + bias > 20). Returns (feeds, mask of those channels)."""
    f = feeds(b, L, d, n, seed=seed)
    kw, big = with_edges({_NAMES[k]: torch.from_numpy(f[k]) for k in _NAMES}, seed)
    return dict(f, **{k: kw[v].numpy() for k, v in _NAMES.items()}), big.numpy()


def check_apart(got, want, big, tol, what, axis):
    """check() on the large-dt channels and on the others separately (|y| differs by ~10x between them)."""
    got, want = np.asarray(got, dtype=np.float32), np.asarray(torch.as_tensor(want), dtype=np.float32)
    for sel, name in ((big, "delta + bias > 20"), (~big, "other channels")):
        check(np.compress(sel, got, axis), np.compress(sel, want, axis), tol, f"{what}, {name}")


# serial and ORT-thread-pool sizes; N = 16, a non-power of two, the maximum
EDGE_SHAPES = [(2, 37, 33, 16), (2, 300, 70, 16), (3, 5, 7, 40), (1, 40, 3, 256)]


@needs_lib
@pytest.mark.parametrize("shape", EDGE_SHAPES)
def test_edge_codes_and_large_dt(shape):
    """-128 codes and softplus's linear range (delta + bias > 20): the op against the int8 reference and its
    own function body, same tolerance."""
    f, big = edge_feeds(*shape, seed=sum(shape) + 2)
    y, h_last = session(scan_model(), threads=2).run(None, f)
    y_body, h_body = session(scan_model(), lib=False).run(None, f)
    y_ref, h_ref = reference(f)
    check_apart(y, y_ref, big, TOL, "y vs int8 ref", 2)
    check_apart(h_last, h_ref, big, TOL, "h_last vs int8 ref", 1)
    check_apart(y, y_body, big, TOL, "y vs function body", 2)
    check_apart(h_last, h_body, big, TOL, "h_last vs function body", 1)


@needs_lib
def test_library_replaces_the_function_body():
    """Registered, the library's kernel runs: one SelectiveScan node in the profile, no Scan; and a model
    without the body runs only with the library."""
    f = feeds(2, 64, 40, 16)
    sess = session(scan_model(), profile=True)
    sess.run(None, f)
    profile = sess.end_profiling()
    with open(profile) as fh:
        ops = {e["args"].get("op_name") for e in json.load(fh) if e.get("cat") == "Node"}
    os.remove(profile)
    print("ops in the profile:", ops)
    assert ops == {"SelectiveScan"}

    bare = scan_model(body=False)
    with pytest.raises(Exception, match="SelectiveScan"):
        session(bare, lib=False)
    y, _ = session(bare).run(None, f)
    check(y, reference(f)[0], TOL, "y, model without body")


@needs_lib
def test_fp16_output():
    f = feeds(2, 50, 40, 16, seed=3)
    y16, h_last = session(scan_model(out_dtype=10)).run(None, f)
    y_ref, h_ref = reference(f)
    assert y16.dtype == np.float16 and h_last.dtype == np.float32
    check(y16, y_ref, TOL_FP16, "fp16 y vs int8 ref")
    check(h_last, h_ref, TOL, "h_last vs int8 ref")
    y16_body, _ = session(scan_model(out_dtype=10), lib=False).run(None, f)
    check(y16, y16_body.astype(np.float32), TOL_FP16, "fp16 y vs function body")


@needs_lib
def test_state_carries_across_calls_and_threads_agree():
    """Two chunks with h_last fed back as h0 equal one call; 1 and 2 intra-op threads give the same bits."""
    f = feeds(2, 96, 48, 16, seed=5)
    y, h_last = session(scan_model(), threads=2).run(None, f)
    y1, h1 = session(scan_model(), threads=1).run(None, f)
    assert np.array_equal(y, y1) and np.array_equal(h_last, h1)
    sess = session(scan_model())
    seq = ("x", "delta", "B", "C", "z")
    first = dict(f, **{k: f[k][:, :40] for k in seq})
    ya, ha = sess.run(None, first)
    yb, hb = sess.run(None, dict(f, h0=ha, **{k: f[k][:, 40:] for k in seq}))
    check(np.concatenate([ya, yb], axis=1), y, 1e-6, "chunked y vs one call")
    check(hb, h_last, 1e-6, "chunked h_last vs one call")


BAD = {
    "B seqlen": lambda f: dict(f, B=f["B"][:, :-1]),
    "A dim": lambda f: dict(f, A=f["A"][:-1]),
    "h0 dstate": lambda f: dict(f, h0=f["h0"][:, :, :-1]),
    "D length": lambda f: dict(f, D=f["D"][:-1]),
    "z batch": lambda f: dict(f, z=f["z"][:1]),
    "N > 256": lambda f: dict(f, A=np.zeros((f["A"].shape[0], 300), np.float32),
                              B=np.zeros(f["B"].shape[:2] + (300,), np.int8),
                              C=np.zeros(f["C"].shape[:2] + (300,), np.int8),
                              h0=np.zeros(f["h0"].shape[:2] + (300,), np.float32)),
}


@needs_lib
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_shapes_raise_an_ort_error(case):
    sess = session(scan_model())
    with pytest.raises(Exception, match="mq::SelectiveScan") as err:
        sess.run(None, BAD[case](feeds(2, 7, 12, 16)))
    print(case, "->", str(err.value).splitlines()[0])
    sess.run(None, feeds(2, 7, 12, 16))   # the session still works


@pytest.mark.parametrize("attrs,match", [(dict(out_dtype=7), "out_dtype"), (dict(z_scale=0.0), "z_scale"),
                                         (dict(x_scale=float("nan")), "x_scale")])
@needs_lib
def test_bad_attributes_fail_at_session_creation(attrs, match):
    with pytest.raises(Exception, match=match):
        session(scan_model(body=False, attrs=attrs))


# ---- mq::SelectiveScanFloat (the FP32 baseline's op) ---------------------------------------------

def float_model(body=True):
    """One mq::SelectiveScanFloat node (float32 everywhere), with or without its function body."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export.scan_op import DOMAIN, INPUTS, OP_FLOAT, OUTPUTS, selective_scan_float_function

    node = h.make_node(OP_FLOAT, list(INPUTS), list(OUTPUTS), domain=DOMAIN)
    graph = h.make_graph([node], "scan_float",
                         [h.make_tensor_value_info(k, T.FLOAT, list(DIMS[k])) for k in INPUTS],
                         [h.make_tensor_value_info("y", T.FLOAT, list("bLd")),
                          h.make_tensor_value_info("h_last", T.FLOAT, list("bdn"))])
    m = h.make_model(graph, functions=[selective_scan_float_function(21)] if body else [],
                     opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)], ir_version=10)
    if body:
        onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()


def float_feeds(b, L, d, n, gate=True, seed=0):
    """The int8 feeds dequantised: the same value ranges, as float32."""
    f = feeds(b, L, d, n, gate=gate, seed=seed)
    for k, s in SCALES.items():
        f[k] = f[k].astype(np.float32) * np.float32(s)
    return f


@needs_lib
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gate", [False, True])
def test_float_op_matches_function_body_and_reference(shape, gate):
    """Same tolerance as the int8 op: float32 on both sides, differing only in summation order and the
    exp/softplus/sigmoid ulps. The float64 reference (silu gate) bounds both."""
    f = float_feeds(*shape, gate=gate, seed=sum(shape) + 1)
    y, h_last = session(float_model()).run(None, f)
    y_body, h_body = session(float_model(), lib=False).run(None, f)
    assert y.dtype == np.float32 and y.shape == y_body.shape and h_last.shape == h_body.shape
    check(y, y_body, TOL, "float op y vs function body")
    check(h_last, h_body, TOL, "float op h_last vs function body")
    if not gate:   # selective_scan_ref gates with silu(z), i.e. gate_scale = 1
        t = {k: torch.from_numpy(v).double() for k, v in f.items()}
        y_ref, h_ref = selective_scan_ref(t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                          t["delta_bias"], True, t["h0"], True)
        check(y, y_ref, TOL, "float op y vs float64 ref")
        check(h_last, h_ref, TOL, "float op h_last vs float64 ref")


@needs_lib
@pytest.mark.parametrize("shape", EDGE_SHAPES)
def test_float_op_edge_values_and_large_dt(shape):
    """The float op on -128 * scale values and delta + bias > 20: against its body and the float64 reference."""
    f, big = edge_feeds(*shape, seed=sum(shape) + 3)
    for k, s in SCALES.items():
        f[k] = f[k].astype(np.float32) * np.float32(s)
    f["gate_scale"] = np.ones_like(f["gate_scale"])    # selective_scan_ref's gate: silu(z)
    y, h_last = session(float_model(), threads=2).run(None, f)
    y_body, h_body = session(float_model(), lib=False).run(None, f)
    t = {k: torch.from_numpy(v).double() for k, v in f.items()}
    y_ref, h_ref = selective_scan_ref(t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                      True, t["h0"], True)
    check_apart(y, y_body, big, TOL, "float op y vs function body", 2)
    check_apart(h_last, h_body, big, TOL, "float op h_last vs function body", 1)
    check_apart(y, y_ref, big, TOL, "float op y vs float64 ref", 2)
    check_apart(h_last, h_ref, big, TOL, "float op h_last vs float64 ref", 1)


@needs_lib
def test_float_op_replaces_its_function_body():
    f = float_feeds(2, 64, 40, 16)
    sess = session(float_model(), profile=True)
    sess.run(None, f)
    profile = sess.end_profiling()
    with open(profile) as fh:
        ops = {e["args"].get("op_name") for e in json.load(fh) if e.get("cat") == "Node"}
    os.remove(profile)
    print("ops in the profile:", ops)
    assert ops == {"SelectiveScanFloat"}
    y, _ = session(float_model(body=False)).run(None, f)   # without the body it runs only on the library
    assert np.isfinite(y).all()


@needs_lib
def test_float_op_bad_shape_is_an_ort_error():
    f = float_feeds(2, 8, 40, 16)
    f["B"] = f["B"][:, :, :8].copy()
    with pytest.raises(Exception, match="B has shape"):
        session(float_model()).run(None, f)


# ---- our C API declarations against the real header ----------------------------------------------

def test_abi_matches_the_real_header():
    """plugins/selective_scan/ort/ort_abi_check.cpp static_asserts every OrtApi slot, OrtCustomOp field and
    enum value we use against onnxruntime_c_api.h. Needs that header ($ONNXRUNTIME_INCLUDE_DIR; no
    registry ships it) and a C++ compiler."""
    import shutil
    import subprocess

    inc = os.environ.get("ONNXRUNTIME_INCLUDE_DIR")
    if not inc or not os.path.isfile(os.path.join(inc, "onnxruntime_c_api.h")):
        pytest.skip("set ONNXRUNTIME_INCLUDE_DIR to a folder with ONNX Runtime's onnxruntime_c_api.h")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no C++ compiler")
    ort_dir = os.path.join(REPO, "plugins", "selective_scan", "ort")
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-I", inc, "-I", ort_dir,
                        os.path.join(ort_dir, "ort_abi_check.cpp")], capture_output=True, text=True)
    print(r.stderr[-2000:])
    assert r.returncode == 0
