"""The native Mamba2 scan (plugins/selective_scan: include/mq_ssd.h, src/ssd_cpu.cpp, src/ssd_cuda.cu,
ort/ssd_ops.cpp, ort/ssd_update.cpp) against its contracts: mq_deploy.ops.ssd.ssd_scan_int8_ref (the exact
semantics of mq::SSDScan), ssd_scan_ref (float64), and the ONNX function bodies of mq::SSDScan(Float) and
mq::SSDStateUpdate(Float) run by ONNX Runtime without the library.

1. The C ABI (mq_ssd_cpu through ctypes) against the references, its checks, decode steps and threads.
2. The ONNX Runtime ops of libmq_scan_ort.so, one node per model: native vs function body vs reference.
3. The CUDA kernels' logic on the CPU (ssd_cuda.cu translated onto tests/cuda_emu, as test_scan_cuda_emulated.py
   does for Mamba1): chunking, the L-split, the decode-step kernel, the caller's workspace.
4. A whole Mamba2 model written by transformers, quantized and exported by the CLI: OrtRunner with and without
   the native library.

Inputs are drawn fresh and reach the edges: -128 codes, softplus in its linear range (dt + dt_bias > 20 on every
other head), the dt_max clamp active and infinite, per-tensor and per-channel scales, 1 and several groups, head_dim
7, 12 and 80, d_state 16, 64, 128 and 256, L = 1, below, at and past the chunk and not a multiple of it, batch 1
and 3, an initial state.

Tolerances, as rel_err (max |diff| / max |ref|), heads with dt + bias > 20 and the others checked apart (|y| differs
by ~20x between them):
  scan, float32 on both sides: 2e-5 (as the Mamba1 kernels). The native kernel and the reference compute the same
  recurrence in float32 from the same codes and scales; they differ in summation order over N (the kernel's
  16-lane partial sums vs torch.sum), FMA contraction and exp/log1p ulps: a few ulps per step that the decaying
  recurrence (A < 0) does not accumulate. The function body is the chunked (matmul) form in float32: another
  summation order and exp of cumulative sums; observed <= 5e-6.
  fused state update, against a float64 reference of the conv and SiLU: the same 2e-5 on y and the state, and
  conv_state_out exactly (a copy of quantized values). The x/B/C scales of those tests are chosen so that no
  value lies within 5e-4 of a rounding tie in code units (float32 conv and SiLU differ from float64, and ONNX
  Runtime's Sigmoid from libm, by <= ~6e-5 there), so every implementation must pick the same int8 codes.
  whole model: FP32 logits 1e-5; W8A8 logits 1e-2 (the QuantizeLinear after the gated norm may move a code by
  one step when the scan outputs differ in their last ulp; a wrong index or scale moves logits by O(1)).
"""

import ctypes
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from mq_deploy.errors import MQUserError
from mq_deploy.ops import native
from mq_deploy.ops.ssd import ssd_scan_int8_ref, ssd_scan_ref, ssd_state_update

from conftest import rel_err
from helpers import ort_lib_marker, ort_session

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_DIR = os.path.join(os.path.dirname(HERE), "plugins", "selective_scan")
LIB, needs_lib = ort_lib_marker()
needs_cpu = pytest.mark.skipif(os.environ.get("MQ_REQUIRE_NATIVE") != "1" and not native.available(),
                               reason=f"{native.unavailable_reason()}")

TOL = 2e-5
BIG_BIAS = 24.0   # dt_bias of the large-dt heads: dt + bias in (22, 26), softplus's linear range
SCALES = dict(x=0.02, dt=0.015, B=0.03, C=0.025)


# ---- inputs -------------------------------------------------------------------------------------------------

def make(b, L, H, P, G, N, seed=0, per_channel=False, edges=True, h0=True):
    """Fresh random codes and parameters in the reference's layout (x [b, L, H, P], B, C [b, L, G, N]). edges:
    -128 in about a tenth of every int8 input (first and last element included) and dt_bias BIG_BIAS on every
    other head. Returns (kwargs of ssd_scan_int8_ref, mask of the large-dt heads)."""
    g = torch.Generator().manual_seed(seed)

    def q(*s):
        t = torch.randint(-127, 128, s, dtype=torch.int8, generator=g)
        if edges:
            t[torch.rand(s, generator=g) < 0.1] = -128
            t.view(-1)[0] = t.view(-1)[-1] = -128
        return t

    kw = dict(qx=q(b, L, H, P), x_scale=SCALES["x"], qdt=q(b, L, H), dt_scale=SCALES["dt"],
              A=-torch.exp(torch.rand(H, generator=g) * 3 - 1.5), qB=q(b, L, G, N), B_scale=SCALES["B"],
              qC=q(b, L, G, N), C_scale=SCALES["C"], D=torch.randn(H, generator=g),
              dt_bias=torch.randn(H, generator=g) * 0.5 - 1.0,
              initial_state=torch.randn(b, H, P, N, generator=g) if h0 else None)
    if per_channel:
        for name, ch in (("x", H * P), ("dt", H), ("B", G * N), ("C", G * N)):
            kw[f"{name}_scale"] = SCALES[name] * (0.5 + torch.rand(ch, generator=g))
    big = torch.zeros(H, dtype=torch.bool)
    if edges:
        big[::2] = True
        kw["dt_bias"][big] = BIG_BIAS
    return kw, big


def check(got, want, tol=TOL, what="y"):
    got, want = torch.as_tensor(np.asarray(got, dtype=np.float32)), torch.as_tensor(want, dtype=torch.float32)
    e = rel_err(got, want)
    print(f"{what}: rel err {e:.2e} (max |ref| {want.abs().max().item():.3g}, tol {tol:.0e})")
    assert e < tol


def check_apart(got, want, big, what, axis, tol=TOL):
    """check() on the large-dt heads and on the others separately (axis: the heads axis of got / want)."""
    got, want = torch.as_tensor(np.asarray(got, dtype=np.float32)), torch.as_tensor(want, dtype=torch.float32)
    for sel, name in ((big, "dt + bias > 20"), (~big, "other heads")):
        if sel.any():
            idx = sel.nonzero().flatten()
            check(got.index_select(axis, idx), want.index_select(axis, idx), tol, f"{what}, {name}")


def scales_of(kw):
    return {k: kw[f"{k}_scale"] for k in ("x", "dt", "B", "C")}


# ---- 1. the C ABI ---------------------------------------------------------------------------------------------

# (b, L, H, P, G, N): one step; L below / past any chunk; head_dim 7, 12, 80; 1, 2, 3 groups; d_state 16, 64, 128
# and the maximum 256; b * L * H * P * N above 65536 in the third and fourth (two threads)
SHAPES = [(1, 1, 2, 12, 1, 16), (3, 5, 4, 12, 2, 64), (2, 70, 2, 80, 1, 128), (1, 300, 6, 12, 3, 16),
          (3, 37, 2, 7, 2, 256), (1, 40, 4, 80, 2, 128)]
ID = "b%d-L%d-H%d-P%d-G%d-N%d"


@needs_cpu
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: ID % s)
def test_cpu_matches_reference(shape, per_channel):
    kw, big = make(*shape, seed=sum(shape), per_channel=per_channel)
    want_y, want_h = ssd_scan_int8_ref(**kw, return_last_state=True)
    y, h = native.ssd_scan_int8_native(**kw, return_last_state=True)
    assert y.shape == want_y.shape and h.shape == want_h.shape and y.dtype == torch.float32
    check_apart(y, want_y, big, "y", 2)
    check_apart(h, want_h, big, "h_last", 1)
    assert torch.equal(native.ssd_scan_int8_native(**kw), y)   # y only: the same numbers


@needs_cpu
@pytest.mark.parametrize("limit", [(0.0, 0.5), (0.05, 2.0), (0.2, None)], ids=["max-0.5", "min-max", "min-only"])
def test_cpu_dt_clamp(limit):
    """dt_max below the large-dt heads' softplus (the clamp active there) and dt_min above the small ones."""
    kw, big = make(2, 40, 4, 12, 2, 64, seed=5)
    want_y, want_h = ssd_scan_int8_ref(**kw, dt_limit=limit, return_last_state=True)
    y, h = native.ssd_scan_int8_native(**kw, dt_limit=limit, return_last_state=True)
    check_apart(y, want_y, big, f"y, dt_limit {limit}", 2)
    check_apart(h, want_h, big, f"h_last, dt_limit {limit}", 1)
    free, _ = ssd_scan_int8_ref(**kw, return_last_state=True)
    assert rel_err(want_y, free) > 1e-2       # the clamp changed the result: the test sees it


@needs_cpu
@pytest.mark.parametrize("shape", [(1, 1, 2, 12, 1, 16), (3, 37, 4, 80, 2, 64), (1, 70, 2, 12, 1, 128)],
                         ids=lambda s: ID % s)
def test_cpu_float_matches_float64_reference(shape):
    """mq::SSDScanFloat's kernel (in_float) against ssd_scan_ref in float64 on the dequantized values."""
    kw, big = make(*shape, seed=sum(shape) + 1)
    b, L, H, P = kw["qx"].shape
    x, dt = kw["qx"].float() * SCALES["x"], kw["qdt"].float() * SCALES["dt"]
    B, C = kw["qB"].float() * SCALES["B"], kw["qC"].float() * SCALES["C"]
    want_y, want_h = ssd_scan_ref(*(t.double() for t in (x, dt, kw["A"], B, C, kw["D"], kw["dt_bias"])),
                                  initial_state=kw["initial_state"].double(), return_last_state=True)
    y, h = native.ssd_scan_native(x, dt, kw["A"], B, C, kw["D"], kw["dt_bias"], initial_state=kw["initial_state"],
                                  return_last_state=True)
    check_apart(y, want_y, big, "float y vs float64", 2)
    check_apart(h, want_h, big, "float h_last vs float64", 1)


@needs_cpu
def test_cpu_decode_steps_in_place_equal_one_call():
    """L calls of one token with the state updated in place (out_state = initial_state) give the bits of one
    call over the L tokens, and each step matches ssd_state_update (the reference decode step)."""
    kw, big = make(2, 9, 4, 12, 2, 16, seed=11, per_channel=True)
    y_all, h_all = native.ssd_scan_int8_native(**kw, return_last_state=True)
    state = kw["initial_state"].clone()
    ref_state = kw["initial_state"].clone()
    ys = []
    for t in range(9):
        step = dict(kw, qx=kw["qx"][:, t:t + 1], qdt=kw["qdt"][:, t:t + 1], qB=kw["qB"][:, t:t + 1],
                    qC=kw["qC"][:, t:t + 1], initial_state=state)
        ys.append(native.ssd_scan_int8_native(**step, out_state=state)[0])
        sc = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in scales_of(kw).items()}
        y_ref, ref_state = ssd_state_update(
            ref_state, (kw["qx"][:, t].float().reshape(2, -1) * sc["x"]).view(2, 4, 12),
            kw["qdt"][:, t].float() * sc["dt"], kw["A"], (kw["qB"][:, t].float().reshape(2, -1) * sc["B"]).view(2, 2, 16),
            (kw["qC"][:, t].float().reshape(2, -1) * sc["C"]).view(2, 2, 16), kw["D"], kw["dt_bias"])
        check_apart(ys[-1][:, 0], y_ref, big, f"step {t} vs ssd_state_update", 1)
    assert torch.equal(torch.cat(ys, 1), y_all) and torch.equal(state, h_all)


@needs_cpu
def test_cpu_threads_agree_bitwise():
    kw, _ = make(3, 50, 6, 12, 2, 64, seed=3)   # b * L * H * P * N above 65536: several threads
    one = native.ssd_scan_int8_native(**kw, return_last_state=True, num_threads=1)
    two = native.ssd_scan_int8_native(**kw, return_last_state=True, num_threads=2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def _params(kw):
    p, y, h, keep = native._ssd_prepare(kw["qx"], kw["qdt"], kw["A"], kw["qB"], kw["qC"], kw["D"], kw["dt_bias"],
                                        (0.0, None), kw["initial_state"], True, scales_of(kw), None, "cpu")
    return p, (y, h, keep)


# each bad field of a valid MQSSDParams, and the words the error must have
BAD_PARAMS = {
    "groups": (lambda p: setattr(p, "groups", 3), "not a multiple of groups"),
    "dstate": (lambda p: setattr(p, "dstate", 300), "dstate=300"),
    "x_scale": (lambda p: setattr(p, "x_scale", float("nan")), "x_scale must be finite"),
    "dt_min": (lambda p: setattr(p, "dt_min", -1.0), "dt_min"),
    "dt_max": (lambda p: setattr(p, "dt_max", float("nan")), "dt_max"),
    "x pointer": (lambda p: setattr(p, "x", None), "pointer x is NULL"),
    "l stride": (lambda p: setattr(p, "bc_l_stride", 1), "l strides"),
    "seqlen": (lambda p: setattr(p, "seqlen", 0), "sizes must be > 0"),
    "in_float": (lambda p: setattr(p, "in_float", 2), "in_float"),
}


@needs_cpu
@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_cpu_refuses_bad_params(case):
    kw, _ = make(2, 5, 4, 12, 2, 16, seed=2)
    p, keep = _params(kw)
    change, words = BAD_PARAMS[case]
    change(p)
    lib = native.load_library()
    assert lib.mq_ssd_cpu(ctypes.byref(p), 1) == native.ERR_INVALID
    msg = native.last_error(lib)
    print(case, "->", msg)
    assert words in msg


@needs_cpu
def test_cpu_refuses_a_bad_per_channel_scale():
    kw, _ = make(2, 5, 4, 12, 2, 16, seed=2, per_channel=True)
    kw["B_scale"][7] = 0.0
    p, keep = _params(kw)
    lib = native.load_library()
    assert lib.mq_ssd_cpu(ctypes.byref(p), 1) == native.ERR_INVALID
    assert "B_scale[7]" in native.last_error(lib)
    kw["B_scale"] = kw["B_scale"][:-1]      # neither one value nor one per channel: refused in Python
    with pytest.raises(MQUserError, match="B_scale must be one value or 32"):
        native.ssd_scan_int8_native(**kw)


def test_ctypes_mirror_matches_the_c_header(tmp_path):
    """include/mq_ssd.h compiles as C, and native.MQSSDParams has its field offsets and size (a C program prints
    them)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    fields = [f for f, _ in native.MQSSDParams._fields_]
    src = tmp_path / "offsets.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include \"mq_ssd.h\"\nint main(void) {\n"
                   + "".join(f'  printf("{f} %zu\\n", offsetof(MQSSDParams, {f}));\n' for f in fields)
                   + '  printf("sizeof %zu\\n", sizeof(MQSSDParams));\n  return 0;\n}\n')
    exe = tmp_path / "offsets"
    import subprocess

    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-I", os.path.join(PLUGIN_DIR, "include"), str(src), "-o",
                    str(exe)], check=True)
    got = dict(line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                          check=True).stdout.splitlines())
    want = {f: getattr(native.MQSSDParams, f).offset for f in fields}
    want["sizeof"] = ctypes.sizeof(native.MQSSDParams)
    assert {k: int(v) for k, v in got.items()} == want


def test_op_yaml_agrees_with_the_plugin_yaml_and_the_export():
    """ssd_scan.yaml (the op), trt/SSDScan_PluginConfig.yaml (the plugin) and export/ssd_op.py name the same
    inputs, outputs and attributes."""
    yaml = pytest.importorskip("yaml")
    from mq_deploy.export import ssd_op

    with open(os.path.join(PLUGIN_DIR, "ssd_scan.yaml")) as f:
        op = yaml.safe_load(f)
    with open(os.path.join(PLUGIN_DIR, "trt", "SSDScan_PluginConfig.yaml")) as f:
        plugin = yaml.safe_load(f)
    for k in ("name", "namespace", "interface"):
        assert op[k] == plugin[k], k
    a, b = op["versions"]["1"], plugin["versions"]["1"]
    for k in ("inputs", "outputs", "input_dims", "input_dim_constraints", "output_dims", "attributes",
              "attribute_types", "attribute_length", "attribute_defaults", "attribute_options", "attributes_required"):
        assert a[k] == b[k], k
    assert op["name"] == ssd_op.OP and tuple(a["inputs"]) == ssd_op.INPUTS and tuple(a["outputs"]) == ssd_op.OUTPUTS
    assert set(a["attributes"]) == set(ssd_op.SCALE_ATTRS + ssd_op.SHAPE_ATTRS + ssd_op.LIMIT_ATTRS)
    assert a["attribute_options"]["d_state"]["max"] == f"={native.MAX_DSTATE}"


# ---- 2. the ONNX Runtime ops ------------------------------------------------------------------------------------

def scan_model(H, P, G, N, chunk=16, scales=None, dt_min=0.0, dt_max=math.inf, body=True, attrs=None, loose=False):
    """One mq::SSDScan node (scales given) or mq::SSDScanFloat (scales None), symbolic b and L, with or without its
    function body. loose: every input dimension symbolic (ONNX Runtime then leaves the shape checks to the op)."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export import ssd_op
    from mq_deploy.export.scan_op import DOMAIN

    quant = scales is not None
    kw = dict(heads=H, head_dim=P, groups=G, d_state=N, chunk=chunk, dt_min=float(dt_min), dt_max=float(dt_max))
    if quant:
        kw.update({f"{k}_scale": [float(v) for v in np.atleast_1d(np.asarray(s, dtype=np.float32))]
                   for k, s in scales.items()})
    kw.update(attrs or {})
    kw = {k: v for k, v in kw.items() if v is not None}
    node = h.make_node(ssd_op.OP if quant else ssd_op.OP_FLOAT, list(ssd_op.INPUTS), list(ssd_op.OUTPUTS),
                       domain=DOMAIN, **kw)
    i8 = T.INT8 if quant else T.FLOAT
    shapes = dict(x=(i8, ["b", "L", H * P]), dt=(i8, ["b", "L", H]), A=(T.FLOAT, [H]), B=(i8, ["b", "L", G * N]),
                  C=(i8, ["b", "L", G * N]), D=(T.FLOAT, [H]), dt_bias=(T.FLOAT, [H]), h0=(T.FLOAT, ["b", H, P, N]))
    if loose:
        shapes = {k: (t, [f"{k}{i}" for i in range(len(d))]) for k, (t, d) in shapes.items()}
    graph = h.make_graph([node], "ssd", [h.make_tensor_value_info(k, *shapes[k]) for k in ssd_op.INPUTS],
                         [h.make_tensor_value_info("y", T.FLOAT, ["b", "L", H * P]),
                          h.make_tensor_value_info("h_last", T.FLOAT, ["b", H, P, N])])
    fn = ssd_op.ssd_scan_function(21) if quant else ssd_op.ssd_scan_float_function(21)
    m = h.make_model(graph, functions=[fn] if body else [],
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
        so.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mq_ssd_ort_profile")
    return ort_session(model, so)


def op_feeds(kw, quant=True):
    b, L, H, P = kw["qx"].shape
    G, N = kw["qB"].shape[2:]
    f = dict(x=kw["qx"].reshape(b, L, H * P), dt=kw["qdt"], A=kw["A"], B=kw["qB"].reshape(b, L, G * N),
             C=kw["qC"].reshape(b, L, G * N), D=kw["D"], dt_bias=kw["dt_bias"], h0=kw["initial_state"])
    if not quant:
        for k in ("x", "dt", "B", "C"):
            f[k] = f[k].float() * torch.as_tensor(kw[f"{k}_scale"], dtype=torch.float32)
    return {k: v.contiguous().numpy() for k, v in f.items()}


def profile_ops(sess):
    path = sess.end_profiling()
    with open(path) as fh:
        ops = {e["args"].get("op_name") for e in json.load(fh) if e.get("cat") == "Node"}
    os.remove(path)
    return ops


# chunk 16 in every model: L = 1, 5 (one partial chunk), 37 (two chunks and a partial one), 48 (three whole ones)
OP_SHAPES = [(1, 1, 2, 12, 1, 16), (3, 5, 4, 12, 2, 64), (2, 37, 2, 80, 1, 128), (1, 48, 6, 12, 3, 16),
             (3, 37, 2, 7, 2, 64)]


@needs_lib
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: ID % s)
def test_op_matches_function_body_and_reference(shape, per_channel):
    kw, big = make(*shape, seed=sum(shape) + 7, per_channel=per_channel)
    b, L, H, P, G, N = shape
    model = scan_model(H, P, G, N, scales=scales_of(kw))
    f = op_feeds(kw)
    y, h_last = session(model, threads=2).run(None, f)
    y_body, h_body = session(model, lib=False).run(None, f)
    want_y, want_h = ssd_scan_int8_ref(**kw, return_last_state=True)
    assert y.dtype == np.float32 and y.shape == (b, L, H * P) and h_last.shape == (b, H, P, N)
    y4, yb4 = y.reshape(b, L, H, P), y_body.reshape(b, L, H, P)
    check_apart(y4, want_y, big, "y vs int8 ref", 2)
    check_apart(h_last, want_h, big, "h_last vs int8 ref", 1)
    check_apart(y4, yb4, big, "y vs function body", 2)
    check_apart(h_last, h_body, big, "h_last vs function body", 1)


@needs_lib
@pytest.mark.parametrize("dt_min,dt_max", [(0.0, 0.5), (0.05, 2.0)])
def test_op_dt_clamp(dt_min, dt_max):
    kw, big = make(2, 37, 4, 12, 2, 16, seed=21)
    model = scan_model(4, 12, 2, 16, scales=scales_of(kw), dt_min=dt_min, dt_max=dt_max)
    f = op_feeds(kw)
    y, h_last = session(model).run(None, f)
    y_body, h_body = session(model, lib=False).run(None, f)
    want_y, want_h = ssd_scan_int8_ref(**kw, dt_limit=(dt_min, dt_max), return_last_state=True)
    check_apart(y.reshape(want_y.shape), want_y, big, "y vs int8 ref", 2)
    check_apart(h_last, want_h, big, "h_last vs int8 ref", 1)
    check_apart(y, y_body, big.repeat_interleave(12), "y vs function body", 2)
    check_apart(h_last, h_body, big, "h_last vs function body", 1)


@needs_lib
@pytest.mark.parametrize("shape", [(1, 1, 2, 12, 1, 16), (3, 37, 4, 80, 2, 64)], ids=lambda s: ID % s)
def test_float_op_matches_function_body_and_reference(shape):
    kw, big = make(*shape, seed=sum(shape) + 9)
    b, L, H, P, G, N = shape
    model = scan_model(H, P, G, N)
    f = op_feeds(kw, quant=False)
    y, h_last = session(model).run(None, f)
    y_body, h_body = session(model, lib=False).run(None, f)
    t = {k: torch.from_numpy(v).double() for k, v in f.items()}
    want_y, want_h = ssd_scan_ref(t["x"].view(b, L, H, P), t["dt"], t["A"], t["B"].view(b, L, G, N),
                                  t["C"].view(b, L, G, N), t["D"], t["dt_bias"], initial_state=t["h0"],
                                  return_last_state=True)
    check_apart(y.reshape(b, L, H, P), want_y, big, "float y vs float64 ref", 2)
    check_apart(h_last, want_h, big, "float h_last vs float64 ref", 1)
    check_apart(y.reshape(b, L, H, P), y_body.reshape(b, L, H, P), big, "float y vs function body", 2)
    check_apart(h_last, h_body, big, "float h_last vs function body", 1)


@needs_lib
@pytest.mark.parametrize("quant", [True, False], ids=["SSDScan", "SSDScanFloat"])
def test_library_replaces_the_function_body(quant):
    """Registered, the library's kernel runs: one node in the profile, none of the body's MatMul / Scan; a model
    without the body runs only with the library."""
    kw, _ = make(2, 40, 4, 12, 2, 16, seed=4)
    scales = scales_of(kw) if quant else None
    f = op_feeds(kw, quant)
    sess = session(scan_model(4, 12, 2, 16, scales=scales), profile=True)
    y, _ = sess.run(None, f)
    ops = profile_ops(sess)
    print("ops in the profile:", ops)
    assert ops == {"SSDScan" if quant else "SSDScanFloat"}
    bare = scan_model(4, 12, 2, 16, scales=scales, body=False)
    with pytest.raises(Exception, match="SSDScan"):
        session(bare, lib=False)
    y_bare, _ = session(bare).run(None, f)
    assert np.array_equal(y_bare, y)


@needs_lib
def test_op_state_carries_across_calls_and_threads_agree():
    kw, _ = make(2, 96, 4, 12, 2, 64, seed=6)
    model = scan_model(4, 12, 2, 64, scales=scales_of(kw))
    f = op_feeds(kw)
    y, h_last = session(model, threads=2).run(None, f)
    y1, h1 = session(model, threads=1).run(None, f)
    assert np.array_equal(y, y1) and np.array_equal(h_last, h1)
    sess = session(model)
    seq = ("x", "dt", "B", "C")
    ya, ha = sess.run(None, dict(f, **{k: f[k][:, :40] for k in seq}))
    yb, hb = sess.run(None, dict(f, h0=ha, **{k: f[k][:, 40:] for k in seq}))
    assert np.array_equal(np.concatenate([ya, yb], axis=1), y) and np.array_equal(hb, h_last)


@needs_lib
def test_op_empty_sequence_passes_the_state_through():
    kw, _ = make(2, 3, 4, 12, 2, 16, seed=8)
    f = op_feeds(kw)
    f = dict(f, **{k: f[k][:, :0] for k in ("x", "dt", "B", "C")})
    y, h_last = session(scan_model(4, 12, 2, 16, scales=scales_of(kw), body=False)).run(None, f)
    assert y.shape == (2, 0, 48) and np.array_equal(h_last, f["h0"])


BAD_SHAPES = {
    "B width": lambda f: dict(f, B=f["B"][:, :, :-1]),
    "dt seqlen": lambda f: dict(f, dt=f["dt"][:, :-1]),
    "A heads": lambda f: dict(f, A=f["A"][:-1]),
    "h0 head_dim": lambda f: dict(f, h0=f["h0"][:, :, :-1]),
    "x width": lambda f: dict(f, x=f["x"][:, :, :-1]),
    "D heads": lambda f: dict(f, D=np.zeros(5, np.float32)),
}


@needs_lib
@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
def test_bad_shapes_raise_an_ort_error(case):
    kw, _ = make(2, 7, 4, 12, 2, 16, seed=1)
    sess = session(scan_model(4, 12, 2, 16, scales=scales_of(kw), body=False, loose=True))
    f = op_feeds(kw)
    with pytest.raises(Exception, match="mq::SSDScan") as err:
        sess.run(None, {k: np.ascontiguousarray(v) for k, v in BAD_SHAPES[case](f).items()})
    print(case, "->", str(err.value).splitlines()[0])
    sess.run(None, f)   # the session still works


@needs_lib
@pytest.mark.parametrize("attrs,match", [
    (dict(x_scale=[0.1, 0.2]), "x_scale has 2 values; expected 1"), (dict(B_scale=[float("nan")]), "B_scale"),
    (dict(groups=3), "not a multiple of groups"), (dict(d_state=300), "d_state 300"), (dict(dt_max=0.0), "dt_max"),
    (dict(dt_min=-1.0), "dt_min"), (dict(heads=None), "missing int attribute heads"), (dict(chunk=0), "chunk")])
def test_bad_attributes_fail_at_session_creation(attrs, match):
    """Checked when the kernel is created (shape attributes against the graph's fixed dims come later)."""
    kw, _ = make(1, 3, 4, 12, 2, 16 if attrs.get("d_state") is None else 300, seed=1)
    with pytest.raises(Exception, match=match):
        session(scan_model(4, 12, 2, kw["qB"].shape[3], scales=scales_of(kw), body=False, attrs=attrs))


# ---- the fused decode update ----------------------------------------------------------------------------------

def update_model(H, P, G, N, K, n_layer, layer, quant, attrs, body=True, loose=False):
    """One mq::SSDStateUpdate(Float) node with every input a graph input and its function body (made per model, as
    the exporter does, from a Mamba2Config of these sizes). loose: every input dimension symbolic."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export import ssd_state_update_op as su
    from mq_deploy.export.scan_op import DOMAIN
    from mq_deploy.families.mamba2.config import Mamba2Config

    cfg = Mamba2Config(d_model=8, d_inner=H * P, head_dim=P, n_groups=G, d_state=N, d_conv=K)
    Cd = cfg.conv_dim
    node = h.make_node(su.OP_UPDATE if quant else su.OP_UPDATE_FLOAT, list(su.INPUTS), list(su.OUTPUTS),
                       domain=DOMAIN, layer=layer, **attrs)
    shapes = dict(xbc=(T.FLOAT, ["b", "L", Cd]), dt=(T.INT8 if quant else T.FLOAT, ["b", "L", H]),
                  conv_state=(T.FLOAT, [n_layer, "b", Cd, K - 1]), ssm_state=(T.FLOAT, [n_layer, "b", H, P, N]),
                  conv_w=(T.FLOAT, [Cd, K]), conv_b=(T.FLOAT, [Cd]), A=(T.FLOAT, [H]), D=(T.FLOAT, [H]),
                  dt_bias=(T.FLOAT, [H]))
    if loose:
        shapes = {k: (t, [f"{k}{i}" for i in range(len(d))]) for k, (t, d) in shapes.items()}
    graph = h.make_graph([node], "update", [h.make_tensor_value_info(k, *shapes[k]) for k in su.INPUTS],
                         [h.make_tensor_value_info("y", T.FLOAT, ["b", "L", H * P]),
                          h.make_tensor_value_info("conv_state_out", T.FLOAT, ["b", Cd, K - 1]),
                          h.make_tensor_value_info("ssm_state_out", T.FLOAT, ["b", H, P, N])])
    from mq_deploy.export import ssd_op

    fns = [su.ssd_state_update_function(cfg, quant, 21),
           ssd_op.ssd_scan_function(21) if quant else ssd_op.ssd_scan_float_function(21)]
    m = h.make_model(graph, functions=fns if body else [],
                     opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)], ir_version=10)
    return m.SerializeToString()


def _conv_silu64(f, layer, conv_scale):
    """The conv input's quant point, [conv_state | xin], the depthwise conv and SiLU in float64: ([b, L, Cd] values,
    the conv states out (float32, exact))."""
    xbc = torch.from_numpy(f["xbc"])
    if conv_scale is not None:
        xbc = torch.round(xbc / conv_scale).clamp(-128, 127) * np.float32(conv_scale)    # half to even, float32
    seq = torch.cat([torch.from_numpy(f["conv_state"][layer]), xbc.transpose(1, 2)], dim=2)   # [b, Cd, K-1+L]
    K = f["conv_w"].shape[1]
    w, bias = torch.from_numpy(f["conv_w"]).double(), torch.from_numpy(f["conv_b"]).double()
    L = xbc.shape[1]
    out = bias[None, :, None] + sum(w[None, :, k, None] * seq.double()[:, :, k:k + L] for k in range(K))
    u = (out * torch.sigmoid(out)).transpose(1, 2)                                    # [b, L, Cd]
    return u, seq[:, :, L:].contiguous()


def _tie_free_scale(v, base, margin=5e-4):
    """A scale near `base` (per tensor: a number; per channel: one per column of v [rows, channels]) for which no
    value of v / scale lies within `margin` of a rounding tie (k + 0.5), so that float32 and float64 round alike."""
    per_channel = np.ndim(base) > 0
    out = np.array(base, dtype=np.float64, copy=True).reshape(-1)
    cols = [v] if not per_channel else [v[:, c:c + 1] for c in range(v.shape[1])]
    for c, col in enumerate(cols):
        for k in range(2000):
            s = np.float32(out[c] * (1 + 1e-3 * k))
            r = np.abs(col.numpy() / np.float64(s))
            frac = np.abs(r - np.floor(r) - 0.5)
            if (frac[r < 127.4] > margin).all():
                out[c] = s
                break
        else:
            raise AssertionError("no tie-free scale found")
    return out.astype(np.float32) if per_channel else float(np.float32(out[0]))


def update_case(b, L, H, P, G, N, K=4, n_layer=3, layer=1, quant=True, per_channel=False, seed=0):
    """Feeds, attributes and an independent torch reference of one fused update."""
    g = torch.Generator().manual_seed(seed)
    HP, GN = H * P, G * N
    Cd = HP + 2 * GN
    conv_scale = 0.05
    codes = torch.randint(-128, 128, (b, L, Cd), generator=g).float()
    xbc = (codes + (torch.rand(b, L, Cd, generator=g) - 0.5) * 0.8) * conv_scale   # away from the conv quant ties
    f = dict(xbc=xbc, dt=torch.randint(-128, 128, (b, L, H), dtype=torch.int8, generator=g),
             conv_state=torch.randint(-128, 128, (n_layer, b, Cd, K - 1), generator=g).float() * conv_scale,
             ssm_state=torch.randn(n_layer, b, H, P, N, generator=g),
             conv_w=torch.randn(Cd, K, generator=g) * 0.5, conv_b=torch.randn(Cd, generator=g) * 0.2,
             A=-torch.exp(torch.rand(H, generator=g) * 3 - 1.5), D=torch.randn(H, generator=g),
             dt_bias=torch.randn(H, generator=g) * 0.5 - 1.0)
    big = torch.zeros(H, dtype=torch.bool)
    big[::2] = True
    f["dt_bias"][big] = BIG_BIAS
    f = {k: v.contiguous().numpy() for k, v in f.items()}
    u, conv_out = _conv_silu64(f, layer, conv_scale if quant else None)
    parts = {"x": u[..., :HP], "B": u[..., HP:HP + GN], "C": u[..., HP + GN:]}
    attrs = dict(heads=H, head_dim=P, groups=G, d_state=N, chunk=16, dt_min=0.0, dt_max=math.inf)
    sc = {"dt": SCALES["dt"]}
    if quant:
        for k, v in parts.items():
            amax = v.abs().amax(dim=(0, 1)) if per_channel else v.abs().max()
            base = (amax / 127).clamp_min(1e-3).numpy() if per_channel else max(float(amax) / 127, 1e-3)
            sc[k] = _tie_free_scale(v.reshape(-1, v.shape[-1]), base)
        if per_channel:
            sc["dt"] = SCALES["dt"] * (0.5 + torch.rand(H, generator=g)).numpy()
        attrs.update(conv_scale=conv_scale,
                     **{f"{k}_scale": [float(s) for s in np.atleast_1d(v)] for k, v in sc.items()})
        q = {k: torch.round(v / torch.as_tensor(sc[k], dtype=torch.float64)).clamp(-128, 127).to(torch.int8)
             for k, v in parts.items()}
        y, h = ssd_scan_int8_ref(q["x"].reshape(b, L, H, P), torch.as_tensor(sc["x"]), torch.from_numpy(f["dt"]),
                                 torch.as_tensor(sc["dt"]), torch.from_numpy(f["A"]), q["B"].reshape(b, L, G, N),
                                 torch.as_tensor(sc["B"]), q["C"].reshape(b, L, G, N), torch.as_tensor(sc["C"]),
                                 torch.from_numpy(f["D"]), torch.from_numpy(f["dt_bias"]),
                                 initial_state=torch.from_numpy(f["ssm_state"][layer]), return_last_state=True)
    else:
        f["dt"] = f["dt"].astype(np.float32) * np.float32(SCALES["dt"])
        y, h = ssd_scan_ref(parts["x"].reshape(b, L, H, P), torch.from_numpy(f["dt"]).double(),
                            torch.from_numpy(f["A"]).double(), parts["B"].reshape(b, L, G, N),
                            parts["C"].reshape(b, L, G, N), torch.from_numpy(f["D"]).double(),
                            torch.from_numpy(f["dt_bias"]).double(),
                            initial_state=torch.from_numpy(f["ssm_state"][layer]).double(), return_last_state=True)
    return f, attrs, (y.reshape(b, L, HP), conv_out, h), big


# (b, L, H, P, G, N): decode (L = 1, b 1 and 3), a few tokens, and past the chunk (16)
UPDATE_SHAPES = [(1, 1, 4, 12, 2, 16), (3, 1, 2, 80, 1, 128), (2, 5, 6, 12, 3, 64), (1, 37, 2, 12, 1, 16)]


@needs_lib
@pytest.mark.parametrize("quant,per_channel", [(True, False), (True, True), (False, False)],
                         ids=["W8-per-tensor", "W8-per-channel", "float"])
@pytest.mark.parametrize("shape", UPDATE_SHAPES, ids=lambda s: ID % s)
def test_update_matches_reference_and_function_body(shape, quant, per_channel):
    b, L, H, P, G, N = shape
    f, attrs, (want_y, want_conv, want_h), big = update_case(*shape, quant=quant, per_channel=per_channel,
                                                             seed=sum(shape))
    model = update_model(H, P, G, N, 4, 3, 1, quant, attrs)
    y, conv, h = session(model, threads=2).run(None, f)
    y_b, conv_b, h_b = session(model, lib=False).run(None, f)
    assert np.array_equal(conv, want_conv.numpy()) and np.array_equal(conv_b, conv)
    big_ch = big.repeat_interleave(P)
    check_apart(y, want_y, big_ch, "y vs reference", 2)
    check_apart(h, want_h, big, "ssm_state_out vs reference", 1)
    check_apart(y, y_b, big_ch, "y vs function body", 2)
    check_apart(h, h_b, big, "ssm_state_out vs function body", 1)


@needs_lib
def test_update_other_conv_widths():
    """d_conv 2 and 5 (the kernel specialises 4): against the function body."""
    for K in (2, 5):
        f, attrs, _, big = update_case(2, 3, 4, 12, 2, 16, K=K, seed=K)
        model = update_model(4, 12, 2, 16, K, 3, 1, True, attrs)
        got, want = session(model).run(None, f), session(model, lib=False).run(None, f)
        assert np.array_equal(got[1], want[1])
        check_apart(got[0], want[0], big.repeat_interleave(12), f"K={K} y vs function body", 2)
        check_apart(got[2], want[2], big, f"K={K} ssm_state_out vs function body", 1)


@needs_lib
def test_update_refuses_a_layer_outside_the_states_and_bad_shapes():
    f, attrs, _, _ = update_case(1, 1, 4, 12, 2, 16, seed=3)
    with pytest.raises(Exception, match="attribute layer 3 is outside the 3 layers"):
        session(update_model(4, 12, 2, 16, 4, 3, 3, True, attrs, body=False)).run(None, f)
    sess = session(update_model(4, 12, 2, 16, 4, 3, 1, True, attrs, body=False, loose=True))
    with pytest.raises(Exception, match=r"conv_b has shape \[111\], expected \[112\]"):
        sess.run(None, dict(f, conv_b=f["conv_b"][:-1]))
    with pytest.raises(Exception, match="ssm_state has shape"):
        sess.run(None, dict(f, ssm_state=np.ascontiguousarray(f["ssm_state"][:, :, :, :-1])))
    sess.run(None, f)   # the session still works


# ---- 3. the CUDA kernels' logic, emulated on the CPU -----------------------------------------------------------

@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the CUDA emulation")
    sys.path.insert(0, os.path.join(HERE, "cuda_emu"))
    import build_emu

    lib = native._declare(ctypes.CDLL(build_emu.build(str(tmp_path_factory.mktemp("cuda_emu_ssd")))))
    return lib


def emu_run(lib, kw, entry="mq_ssd_cuda", workspace=None, out_state=None):
    p, y, h, _keep = native._ssd_prepare(kw["qx"], kw["qdt"], kw["A"], kw["qB"], kw["qC"], kw["D"], kw["dt_bias"],
                                         kw.get("dt_limit", (0.0, None)), kw["initial_state"], True, scales_of(kw),
                                         out_state, "cpu")
    if entry == "mq_ssd_cuda_ws":
        rc = lib.mq_ssd_cuda_ws(ctypes.byref(p), workspace.data_ptr(), workspace.numel(), None)
    else:
        rc = getattr(lib, entry)(ctypes.byref(p), None)
    assert rc == 0, native.last_error(lib)
    return y, h


# chunks of 16 steps (8 at N = 256): L = 1, 37 (partial chunk), 300 (split into 4 segments at b = 1), 140 (2
# segments, N = 128 with 4 rows a block: P = 20 straddles blocks), N = 40 and 7 padded to 64 and 16 states
EMU_SHAPES = [(1, 1, 2, 12, 1, 16), (2, 37, 4, 80, 2, 64), (1, 300, 2, 12, 1, 16), (1, 140, 2, 20, 2, 128),
              (1, 20, 2, 7, 2, 256), (1, 200, 1, 5, 1, 40)]


@pytest.mark.parametrize("split", ["auto", "0"])
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: ID % s)
def test_cuda_kernel_logic(emu, shape, split, monkeypatch):
    monkeypatch.setenv("MQ_SCAN_CUDA_SPLIT", split)
    kw, big = make(*shape, seed=sum(shape) + 13, per_channel=shape[0] == 2)
    want_y, want_h = ssd_scan_int8_ref(**kw, return_last_state=True)
    y, h = emu_run(emu, kw)
    check_apart(y, want_y, big, "y", 2)
    check_apart(h, want_h, big, "h_last", 1)


def test_cuda_dt_clamp(emu):
    kw, big = make(1, 150, 2, 12, 1, 16, seed=17)   # splits into 2 segments
    kw["dt_limit"] = (0.05, 0.5)
    want_y, want_h = ssd_scan_int8_ref(**{k: v for k, v in kw.items()}, return_last_state=True)
    y, h = emu_run(emu, kw)
    check_apart(y, want_y, big, "y", 2)
    check_apart(h, want_h, big, "h_last", 1)


@pytest.mark.parametrize("N", [16, 5, 40, 256])
def test_cuda_decode_step_in_place(emu, N):
    """The step kernel (np lanes a row: 16, 8, 32 and 32 with 8 states a lane) as L decode steps with the state
    updated in place equals the reference over the L tokens."""
    kw, big = make(2, 4, 4, 12, 2, N, seed=N, per_channel=True)
    want_y, want_h = ssd_scan_int8_ref(**kw, return_last_state=True)
    state = kw["initial_state"].clone()
    ys = []
    for t in range(4):
        step = dict(kw, qx=kw["qx"][:, t:t + 1], qdt=kw["qdt"][:, t:t + 1], qB=kw["qB"][:, t:t + 1],
                    qC=kw["qC"][:, t:t + 1], initial_state=state)
        ys.append(emu_run(emu, step, "mq_ssd_step_cuda", out_state=state)[0])
    check_apart(torch.cat(ys, 1), want_y, big, "y of the steps", 2)
    check_apart(state, want_h, big, "state", 1)


def test_cuda_caller_workspace(emu, monkeypatch):
    """mq_ssd_cuda_ws (the TensorRT plugin's entry point) splits into the given scratch and scans unsplit with
    too little; mq_ssd_cuda_workspace_size is 0 where nothing splits; in-place state never splits."""
    monkeypatch.delenv("MQ_SCAN_CUDA_SPLIT", raising=False)
    kw, big = make(1, 300, 2, 12, 1, 16, seed=31)
    want_y, want_h = ssd_scan_int8_ref(**kw, return_last_state=True)
    p, keep = _params(kw)
    need = emu.mq_ssd_cuda_workspace_size(ctypes.byref(p))
    assert need == 4 * 4 * (2 + 2 * 12 * 16)     # 4 segments x (dt * A sum + state) per head, float32
    for give in ("enough", "too little"):
        ws = torch.zeros(need if give == "enough" else need // 2, dtype=torch.uint8)
        y, h = emu_run(emu, kw, "mq_ssd_cuda_ws", workspace=ws)
        check_apart(y, want_y, big, f"y, {give}", 2)
        check_apart(h, want_h, big, f"h_last, {give}", 1)
        assert (ws.count_nonzero() > 0) == (give == "enough")
    small, _ = make(8, 40, 24, 64, 1, 16, seed=32)
    assert emu.mq_ssd_cuda_workspace_size(ctypes.byref(_params(small)[0])) == 0
    state = kw["initial_state"].clone()
    y, _ = emu_run(emu, dict(kw, initial_state=state), out_state=state)    # in place: unsplit, still right
    check_apart(y, want_y, big, "y, in place", 2)
    check_apart(state, want_h, big, "state, in place", 1)


def test_cuda_entry_points_refuse(emu):
    kw, _ = make(1, 3, 2, 12, 1, 16, seed=1)
    p, keep = _params(kw)
    assert emu.mq_ssd_step_cuda(ctypes.byref(p), None) == native.ERR_INVALID
    assert "seqlen must be 1" in native.last_error(emu)
    p.in_float = 1
    assert emu.mq_ssd_cuda(ctypes.byref(p), None) == native.ERR_INVALID
    assert "int8 inputs only" in native.last_error(emu)


# ---- 4. a whole Mamba2 model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mamba2_exports(tmp_path_factory):
    """A random Mamba2ForCausalLM written by transformers (2 groups, head_dim 12, a time_step_limit), quantized
    (W8A8 mambaquant, per-tensor and --ssm-scales grouped) and exported by the CLI: full and decode-step graphs,
    W8A8 and FP32."""
    transformers = pytest.importorskip("transformers")
    from mq_deploy.cli.main import main

    d = tmp_path_factory.mktemp("mamba2_native")
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=256, hidden_size=48, num_hidden_layers=2, state_size=16, head_dim=12,
                                    num_heads=8, n_groups=2, expand=2, conv_kernel=4, chunk_size=16,
                                    time_step_limit=(0.0, 2.0), tie_word_embeddings=True)
    model = transformers.Mamba2ForCausalLM(cfg)
    with torch.no_grad():   # spread dt_bias so that some heads reach the dt_max clamp
        for layer in model.backbone.layers:
            layer.mixer.dt_bias.copy_(torch.linspace(-3, 3, 8))
    model.save_pretrained(d / "hf")
    text = d / "calib.txt"
    text.write_bytes(b"In the beginning God created the heaven and the earth. And the earth was without form. " * 30)
    out = {"hf": str(d / "hf"), "q": str(d / "q"), "qg": str(d / "qg")}
    for q, extra in (("q", []), ("qg", ["--ssm-scales", "grouped"])):   # grouped: per-channel scale attributes
        assert main(["quantize", out["hf"], "-o", out[q], "--calib", str(text), "--calib-samples", "4",
                     "--seq-len", "64", *extra]) == 0
    for name, src, extra in (("w8", out["q"], []), ("w8_step", out["q"], ["--decode-step"]),
                             ("w8g", out["qg"], []), ("w8g_step", out["qg"], ["--decode-step"]),
                             ("fp", out["hf"], []), ("fp_step", out["hf"], ["--decode-step"])):
        out[name] = str(d / f"{name}.onnx")
        assert main(["export", src, "-o", out[name], *extra]) == 0
        nodes = [n for n in onnx.load(out[name]).graph.node if n.domain == "mq" and n.op_type.startswith("SSD")]
        assert nodes and all(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "dt_max")) == 2.0
                             for n in nodes)   # the checkpoint's time_step_limit reaches the ops
        if name.startswith("w8g"):   # one scale per channel: 96 for x (8 heads of 12), 32 for B (2 groups of 16)
            scales = {a.name: len(a.floats) for a in nodes[0].attribute if a.name.endswith("_scale")}
            assert scales["x_scale"] == 96 and scales["dt_scale"] == 8 and scales["B_scale"] == 32, scales
    return out


def _runners(path):
    """(OrtRunner as mq-deploy makes it, with the library it registers by default; one on the function bodies)"""
    from mq_deploy.backends.ort.runner import ORT_LIB_ENV, OrtRunner

    native_runner = OrtRunner(path)
    if not os.environ.get(ORT_LIB_ENV):
        assert native_runner.custom_op_library == LIB     # the default: mq_deploy/_native's library
    return native_runner, OrtRunner(path, custom_op_library=False)


def _uses_native_ops(path, ops):
    so = ort.SessionOptions()
    so.register_custom_ops_library(LIB)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mq_ssd_model_profile")
    sess = ort_session(path, so)
    feeds = {}
    for i in sess.get_inputs():
        shape = [1 if isinstance(s, str) or s is None else s for s in i.shape]
        feeds[i.name] = np.zeros(shape, np.int64 if "int64" in i.type else np.float32)
        if i.name == "input_ids":
            feeds[i.name] = np.zeros((1, 3), np.int64)
    sess.run(None, feeds)
    seen = profile_ops(sess)
    print(os.path.basename(path), "ops:", sorted(o for o in seen if o))
    return ops <= seen and not ({"Scan", "CumSum", "Trilu"} & seen)


@needs_lib
@pytest.mark.parametrize("kind,tol", [("w8", 1e-2), ("w8g", 1e-2), ("fp", 1e-5)], ids=["W8A8", "W8A8-grouped", "FP32"])
def test_model_full_graph_native_equals_function_bodies(mamba2_exports, kind, tol):
    path = mamba2_exports[kind]
    assert _uses_native_ops(path, {"SSDScanFloat" if kind == "fp" else "SSDScan"})
    ids = np.random.default_rng(0).integers(0, 256, (3, 41)).astype(np.int64)    # L past the chunk (16)
    nat, body = _runners(path)
    got, want = nat.infer({"input_ids": ids})["logits"], body.infer({"input_ids": ids})["logits"]
    e = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{kind} full graph, native vs function bodies: logits rel err {e:.2e} (tol {tol})")
    assert e <= tol


@needs_lib
@pytest.mark.parametrize("kind,tol", [("w8_step", 1e-2), ("w8g_step", 1e-2), ("fp_step", 1e-5)],
                         ids=["W8A8", "W8A8-grouped", "FP32"])
def test_model_decode_steps_native_equal_function_bodies(mamba2_exports, kind, tol):
    """A prefill of 20 tokens through the step graph, then 5 decode steps, carrying the states: native vs
    function bodies on logits and both states at every call; and the native steps' last logits against the
    native full graph's."""
    path = mamba2_exports[kind]
    assert _uses_native_ops(path, {"SSDStateUpdateFloat" if kind == "fp_step" else "SSDStateUpdate"})
    nat, body = _runners(path)
    specs = nat.input_specs
    b = 2
    states = {n: np.zeros((specs[n].shape[0], b) + tuple(specs[n].shape[2:]), np.float32)
              for n in ("conv_state", "ssm_state")}
    ids = np.random.default_rng(1).integers(0, 256, (b, 25)).astype(np.int64)
    s_nat, s_body = dict(states), dict(states)
    worst = 0.0
    for t0, t1 in [(0, 20)] + [(t, t + 1) for t in range(20, 25)]:
        got = nat.infer({"input_ids": ids[:, t0:t1], **s_nat})
        want = body.infer({"input_ids": ids[:, t0:t1], **s_body})
        errs = [float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-30)) for k in got]
        worst = max(worst, *errs)
        s_nat = {"conv_state": got["conv_state_out"], "ssm_state": got["ssm_state_out"]}
        s_body = {"conv_state": want["conv_state_out"], "ssm_state": want["ssm_state_out"]}
    print(f"{kind}: native vs function bodies over prefill + 5 steps, worst rel err {worst:.2e} (tol {tol})")
    assert worst <= tol
    full, _ = _runners(mamba2_exports[kind.replace("_step", "")])
    whole = full.infer({"input_ids": ids})["logits"][:, -1]
    e = float(np.abs(got["logits"][:, -1] - whole).max() / np.abs(whole).max())
    print(f"{kind}: last decode step vs the full graph at position 25: rel err {e:.2e} (tol {max(tol, 1e-4)})")
    assert e <= max(tol, 1e-4)
