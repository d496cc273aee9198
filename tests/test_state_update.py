"""mq::SelectiveStateUpdate(Float), the fused decode-step op (export/state_update_op.py, native kernel in
plugins/selective_scan/ort/state_update.cpp).

1. The fused step graph against the unfused one (the same ops as the full graph), natively and through its
   function body, FP32 and W8A8, Mamba and FalconMamba, at the decode sizes (L = 1) and past the kernel's
   per-channel path (L > 8). Like is compared with like: the native fused graph against the unfused graph
   with the native scan, the body against the unfused graph without the library (the body's scan is
   mq::SelectiveScan's own body, whose exp is libm's, not the kernel's polynomial: between the two an int8
   quant point near a rounding boundary moves by one step, ~1e-2 of the logits). The models are seeded.
   Tolerances, as max |diff| / max |ref| over logits and both states:
     FP32: 2e-6. Both compute in float32 from the same weights; they differ in summation order (the conv
     taps, the x_proj / dt_proj dots, C . h) and, native, in the kernel's exp2/sigmoid polynomials.
     W8A8: 1e-2. Every quant point is computed as QuantizeLinear does (round half to even of v / s), but the
     fused kernel's float32 conv, SiLU and FalconMamba RMS norms are not ORT's Conv, Sigmoid and
     SimplifiedLayerNormalization bit for bit: a value within float rounding of a rounding boundary takes
     the other int8 step, and the recurrence and the next layer carry it (observed: bitwise equal except
     FalconMamba at L = 70, 3.7e-3). A wrong index or scale moves the logits by O(1). The exact check of the
     kernel's quant points is part 2, which keeps its inputs away from rounding ties.
2. The native kernel alone (one node) against an independent torch reference written here from
   state_update.h's contract (F.conv1d over [conv_state | x], matmuls, selective_scan_ref and
   selective_scan_int8_ref), over every specialisation: d_conv 4 (compile-time) and others (1, 2, 3, 5),
   d_state 16 (compile-time, eight channels summed together) and others (7, 8, 64, 256), L <= 8 (per-channel scan) and
   L > 8 (the library's scan), the serial and the thread-pool paths, with -128 codes, saturating quant
   points and delta + bias > 20 (softplus's linear range), the split and per-token x_proj passes. See
   test_kernel_matches_the_reference.
"""


import numpy as np
import pytest

from helpers import ort_lib_marker, ort_session, small_lm

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

LIB, needs_lib = ort_lib_marker()


def _session(proto, lib):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if lib:
        so.register_custom_ops_library(LIB)
    return ort_session(proto.SerializeToString(), so)


def _quantized(m):
    from mq_deploy.calib.collect import text_forward_loop
    from mq_deploy.export.graph import QuantSpec
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

    ids = np.random.default_rng(0).integers(0, m.cfg.vocab_size, 4096)
    sc = apply_recipe(m, text_forward_loop(ids, 64, 8), RecipeConfig("mambaquant"))
    return QuantSpec(8, 8, sc["act_scales"], sc["weight_scales"], "mambaquant")


@pytest.fixture(scope="module", params=["mamba", "falcon"])
def models(request):
    import torch

    from mq_deploy.export.graph import build_model

    torch.manual_seed(0)   # small_lm's perturbation draws from the global generator: same models every run
    kw = dict(vocab=256, d_model=64, d_model2=64, n_layer=2)
    if request.param == "falcon":
        kw["mixer_rms_eps"] = 1e-6
    out = {}
    for quant in (False, True):
        m = small_lm(**kw)
        spec = _quantized(m) if quant else None
        out[quant] = (m, build_model(m, spec, step=True), build_model(m, spec, step=True, fused_step=False))
    return request.param, out


def _feeds(m, b, L, seed):
    rng = np.random.default_rng(seed)
    cfg, mx = m.cfg, m.cfg.mixer
    return {"input_ids": rng.integers(0, cfg.vocab_size, (b, L)).astype(np.int64),
            "conv_state": rng.standard_normal((cfg.n_layer, b, mx.d_inner, mx.d_conv - 1)).astype(np.float32),
            "ssm_state": rng.standard_normal((cfg.n_layer, b, mx.d_inner, mx.d_state)).astype(np.float32)}


def _rel(a, b):
    return float(np.abs(a - b).max() / max(1e-30, np.abs(b).max()))


def test_fused_step_graph_has_one_update_node_per_layer(models):
    from mq_deploy.export.state_update_op import OP_UPDATE, OP_UPDATE_FLOAT

    _, out = models
    for quant, (m, fused, plain) in out.items():
        ops = [n.op_type for n in fused.graph.node]
        assert ops.count(OP_UPDATE if quant else OP_UPDATE_FLOAT) == m.cfg.n_layer
        assert "Conv" not in ops and "Conv" in [n.op_type for n in plain.graph.node]
        assert {f.name for f in fused.functions} >= {OP_UPDATE if quant else OP_UPDATE_FLOAT}


@pytest.mark.parametrize("lib", [pytest.param(True, marks=needs_lib), False], ids=["native", "body"])
@pytest.mark.parametrize("b,L", [(1, 1), (3, 1), (2, 9), (1, 70)])
def test_fused_step_equals_the_unfused_graph(models, lib, b, L):
    kind, out = models
    for quant, (m, fused, plain) in out.items():
        feeds = _feeds(m, b, L, seed=10 * b + L)
        ref = _session(plain, lib).run(None, feeds)
        got = _session(fused, lib).run(None, feeds)
        errs = [_rel(g, r) for g, r in zip(got, ref)]
        tol = 1e-2 if quant else 2e-6
        print(f"{kind} {'W8A8' if quant else 'FP32'} {'native' if lib else 'body'} b={b} L={L}: "
              f"logits {errs[0]:.2e}, conv_state {errs[1]:.2e}, ssm_state {errs[2]:.2e} (tol {tol})")
        assert max(errs) <= tol


@needs_lib
def test_native_update_names_a_bad_shape():
    """A weight of the wrong shape: one ORT error naming the input and both shapes."""
    from onnx import numpy_helper

    m = small_lm(vocab=256, d_model=64, d_model2=64, n_layer=1)
    from mq_deploy.export.graph import build_model

    proto = build_model(m, step=True)
    init = {t.name: t for t in proto.graph.initializer}
    upd = next(n for n in proto.graph.node if n.op_type == "SelectiveStateUpdateFloat")
    dt_w = init[upd.input[7]]
    bad = numpy_helper.to_array(dt_w)[:, :-1]
    dt_w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(bad), dt_w.name))
    with pytest.raises(Exception, match=r"dt_proj_w has shape \[4, 127\], expected \[4, 128\]"):
        _session(proto, True).run(None, _feeds(m, 1, 1, 0))


# ---- the kernel alone against an independent reference -------------------------------------------

def _update_model(quant, shapes, attrs):
    """One mq::SelectiveStateUpdate(Float) node with every input a graph input, no function body (the library
    must run it)."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export.scan_op import DOMAIN
    from mq_deploy.export.state_update_op import INPUTS, INPUTS_FLOAT, OP_UPDATE, OP_UPDATE_FLOAT, OUTPUTS

    names = INPUTS if quant else INPUTS_FLOAT
    int8 = {"z", "x_proj_w", "dt_proj_w"} if quant else set()
    node = h.make_node(OP_UPDATE if quant else OP_UPDATE_FLOAT, list(names), list(OUTPUTS), domain=DOMAIN, **attrs)
    graph = h.make_graph([node], "update", [h.make_tensor_value_info(k, T.INT8 if k in int8 else T.FLOAT, shapes[k])
                                            for k in names],
                         [h.make_tensor_value_info(k, T.FLOAT, None) for k in OUTPUTS])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)], ir_version=10)


def _codes(w, g):
    """Symmetric per-row int8 codes of w [rows, cols] (scale max|row| / 127), with -128 at a few places
    (QuantizeLinear of a value just past -127.5 * scale)."""
    import torch

    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    q = torch.round(w / scale).clamp(-127, 127)
    q[torch.rand(q.shape, generator=g) < 0.05] = -128
    return q.to(torch.int8), scale.squeeze(1)


def _update_inputs(b, L, Di, N, R, K, falcon, quant, seed):
    """Random inputs and attributes of the op, with the edges: x past -128 * conv_scale (saturating codes),
    -128 codes in z and both weights, dt_low / B / C / delta scales that saturate, delta_bias 24 (delta + bias
    > 20) on every third channel. Two stacked layers, the op reading layer 1."""
    import torch

    from helpers import BIG_BIAS

    g = torch.Generator().manual_seed(seed)
    n_layer, layer = 2, 1
    f = dict(x=torch.randn(b, L, Di, generator=g),
             conv_state=torch.randn(n_layer, b, Di, K - 1, generator=g),
             ssm_state=torch.randn(n_layer, b, Di, N, generator=g),
             conv_w=torch.randn(Di, K, generator=g) * 0.7 / K ** 0.5, conv_b=torch.randn(Di, generator=g) * 0.1,
             delta_bias=torch.randn(Di, generator=g) * 0.5 - 1.0, A=-(torch.rand(Di, N, generator=g) * 2 + 0.05),
             D=torch.randn(Di, generator=g), gate_scale=torch.rand(Di, generator=g) * 1.5 + 0.25)
    f["x"].view(-1)[::17] = -5.0           # beyond -128 * conv_scale: QuantizeLinear saturates
    f["delta_bias"][::3] = BIG_BIAS
    z = torch.randint(-128, 128, (b, L, Di), dtype=torch.int8, generator=g)
    z.view(-1)[0] = -128
    xw = torch.randn(R + 2 * N, Di, generator=g) / Di ** 0.5
    dtw = torch.randn(R, Di, generator=g) / R ** 0.5
    nrm = 1.0 if falcon else 0.5     # dt_low, B, C are ~N(0, 1) after FalconMamba's RMS norm
    attrs = dict(layer=layer)
    if falcon:
        attrs["norm_eps"] = 1e-6
    if quant:
        attrs.update(conv_scale=3.0 / 127, x_scale=2.5 / 127, dt_low_scale=2.2 * nrm / 127, delta_scale=2.5 / 127,
                     B_scale=2.2 * nrm / 127, C_scale=2.0 * nrm / 127, z_scale=0.03)
        xw_q, xw_s = _codes(xw, g)
        dtw_q, dtw_s = _codes(dtw.T.contiguous(), g)       # dt_proj: one scale per output channel (column)
        f.update(z=z, x_proj_w=xw_q, x_proj_scale=xw_s, dt_proj_w=dtw_q.T.contiguous(), dt_proj_scale=dtw_s)
    else:
        f.update(z=z.float() * 0.03, x_proj_w=xw, dt_proj_w=dtw)
    return f, attrs


def _q(v, s):
    """ONNX QuantizeLinear to int8 (zero point 0): round half to even of v / s, saturated."""
    import torch

    return torch.round(v / torch.tensor(s, dtype=v.dtype)).clamp(-128, 127).to(torch.int8)


def _ambiguous(v, s, margin=1e-4):
    """Where v / s (float64) lies within `margin` steps of a rounding boundary that changes the saturated
    code: the kernel's float32 value may round either way there."""
    t = v.double() / s
    return (t - margin).round().clamp(-128, 127) != (t + margin).round().clamp(-128, 127)


def _update_reference(f, attrs, quant):
    """state_update.h's contract, written independently of the kernel: the conv as F.conv1d over
    [conv_state | x] (valid, per channel), matmuls, selective_scan_ref / selective_scan_int8_ref. Quant
    points whose input is exact in float32 (the int8 dots times their scales) are computed in float32 as
    QuantizeLinear does; the others (silu of the conv, FalconMamba's RMS norms) in float64, and reported in
    the returned masks when they sit within 1e-4 steps of a rounding boundary. Returns ((y, conv_state_out,
    ssm_state_out), token-channel mask, token mask)."""
    import torch
    import torch.nn.functional as F

    from mq_deploy.ops.selective_scan import selective_scan_int8_ref, selective_scan_ref

    layer, eps = attrs["layer"], attrs.get("norm_eps")
    x = f["x"]
    b, L, Di = x.shape
    N = f["A"].shape[1]
    R = f["dt_proj_w"].shape[0]
    if quant:
        x = _q(x, attrs["conv_scale"]).float() * torch.tensor(attrs["conv_scale"], dtype=torch.float32)
    seq = torch.cat([f["conv_state"][layer], x.transpose(1, 2)], 2)         # [b, Di, K-1+L]
    conv_out = seq[..., L:]
    xc = F.silu(F.conv1d(seq.double(), f["conv_w"].double()[:, None, :], f["conv_b"].double(), groups=Di))
    xc = xc.transpose(1, 2)                                                   # [b, L, Di], float64
    amb_u = torch.zeros(b, L, Di, dtype=torch.bool)
    amb_row = torch.zeros(b, L, dtype=torch.bool)

    def rms(v):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    if not quant:
        dbc = xc @ f["x_proj_w"].double().T
        dt_low, B, C = dbc.split([R, N, N], -1)
        if eps is not None:
            dt_low, B, C = rms(dt_low), rms(B), rms(C)
        delta = dt_low @ f["dt_proj_w"].double()
        y, h = selective_scan_ref(xc, delta, f["A"].double(), B, C, f["D"].double(), None, f["delta_bias"].double(),
                                  True, f["ssm_state"][layer].double(), True)
        z = f["z"].double()
        y = y * z * torch.sigmoid(f["gate_scale"].double() * z)
        return (y, conv_out, h), amb_u, amb_row
    amb_u = _ambiguous(xc, attrs["x_scale"])
    u_q = _q(xc, attrs["x_scale"])
    dot = (u_q.long() @ f["x_proj_w"].long().T).float()                       # exact int32 sums
    dbc = dot * (torch.tensor(attrs["x_scale"], dtype=torch.float32) * f["x_proj_scale"])
    dt_low, B, C = dbc.split([R, N, N], -1)
    names = ("dt_low_scale", "B_scale", "C_scale")
    if eps is not None:                                                       # float64 and checked for ties
        dt_low, B, C = rms(dt_low.double()), rms(B.double()), rms(C.double())
        for v, k in zip((dt_low, B, C), names):
            amb_row |= _ambiguous(v, attrs[k]).any(-1)
    dtl_q, B_q, C_q = (_q(v, attrs[k]) for v, k in zip((dt_low, B, C), names))
    iacc = (dtl_q.long() @ f["dt_proj_w"].long()).float()                     # exact int32 sums
    delta_q = _q(iacc * (torch.tensor(attrs["dt_low_scale"], dtype=torch.float32) * f["dt_proj_scale"]),
                 attrs["delta_scale"])
    y, h = selective_scan_int8_ref(u_q, attrs["x_scale"], delta_q, attrs["delta_scale"], f["A"], B_q,
                                   attrs["B_scale"], C_q, attrs["C_scale"], f["D"], f["z"], attrs["z_scale"],
                                   f["delta_bias"], True, f["ssm_state"][layer], True, f["gate_scale"])
    return (y, conv_out, h), amb_u, amb_row


# (b, L, Di, N, dt_rank, d_conv, FalconMamba norms): d_conv 4 is the kernel's compile-time case, 1/2/3/5 the
# generic one; d_state 16 the compile-time case (eight channels summed together), 7 (odd), 8 (power of two), 64 and 256 the
# generic one; L <= 8 runs the per-channel scan, L > 8 the library's; Di 70 and 33 leave partial 64- and
# 16-channel blocks. The first three have b * L * Di * N < 8192 and run on the calling thread, the others on
# ORT's thread pool; up to 32 token rows (b * L) x_proj's outputs are split across tasks (all but the last
# three), past that each task takes its own tokens.
KERNEL_CASES = [(1, 1, 70, 16, 5, 4, False), (2, 8, 70, 7, 5, 3, True), (3, 5, 33, 8, 4, 2, False),
                (1, 9, 70, 16, 5, 4, True), (2, 12, 40, 64, 6, 5, False), (1, 3, 20, 256, 3, 1, False),
                (1, 70, 64, 16, 4, 4, True), (2, 40, 832, 16, 52, 4, False), (2, 40, 832, 7, 52, 3, True)]


@needs_lib
@pytest.mark.parametrize("quant", [True, False], ids=["int8", "float"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "b%d-L%d-Di%d-N%d-R%d-K%d%s" % (*c[:6], "-falcon" * c[6]))
def test_kernel_matches_the_reference(case, quant):
    """Tolerances (max |diff| / max |ref|, the large-dt channels and the others apart):
    conv_state_out: exact (a copy of the inputs, after the conv quant point in the int8 op).
    int8 op, y and ssm_state: 2e-5, the native scan's bound (test_native_scan): the reference reproduces
    every quant point's codes exactly (the int8 dots are exact, the float32 products are the kernel's),
    except where the kernel's float32 conv/silu or RMS norm cannot be matched bit for bit; the inputs are
    redrawn there until no value lies within 1e-4 steps of a rounding boundary, so both sides scan the
    same codes and differ only as the native scan does from its reference.
    float op: 2e-5 against the float64 reference: float32 dots over Di (up to 832) and the scan's few ulps."""
    import torch

    b, L, Di, N, R, K, falcon = case
    f, attrs = _update_inputs(b, L, Di, N, R, K, falcon, quant, seed=sum(case[:6]))
    rounds = 0
    while True:
        want, amb_u, amb_row = _update_reference(f, attrs, quant)
        if not (amb_u.any() or amb_row.any()):
            break
        rounds += 1
        assert rounds <= 10, "inputs still near a rounding boundary after 10 redraws"
        g = torch.Generator().manual_seed(1000 + rounds)
        fresh = torch.randn(f["x"].shape, generator=g)
        redraw = amb_u | amb_row[..., None]
        f["x"] = torch.where(redraw, fresh, f["x"])
    print(f"{'int8' if quant else 'float'} {case}: {rounds} redraw round(s) for rounding ties")
    shapes = {k: list(v.shape) for k, v in f.items()}
    got = _session(_update_model(quant, shapes, attrs), True).run(None, {k: v.numpy() for k, v in f.items()})
    big = torch.zeros(Di, dtype=torch.bool)
    big[::3] = True
    assert (f["delta_bias"][big] > 20).all()
    if quant:
        assert (f["z"] == -128).any() and (f["x_proj_w"] == -128).any() and (f["dt_proj_w"] == -128).any()
    y, conv_out, h = (torch.from_numpy(np.asarray(a)) for a in got)
    assert torch.equal(conv_out, want[1].float()), "conv_state_out"
    tol = 2e-5
    for name, g_, w_, axis in (("y", y, want[0], 2), ("ssm_state", h, want[2], 1)):
        for sel, part in ((big, "delta + bias > 20"), (~big, "other channels")):
            e = _rel(g_.index_select(axis, sel.nonzero().squeeze(1)).double().numpy(),
                     w_.index_select(axis, sel.nonzero().squeeze(1)).double().numpy())
            print(f"  {name}, {part}: rel err {e:.2e} (tol {tol:.0e})")
            assert e <= tol, (name, part)


# ---- scratch that cannot be had: an ORT error, never an abort -------------------------------------

_RUN_HUGE = r"""
import resource, sys
import numpy as np, onnxruntime as ort
model, lib, L, R, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))   # address space: a failed allocation fails here, now
so = ort.SessionOptions()
so.register_custom_ops_library(lib)
so.intra_op_num_threads = 2
so.log_severity_level = 4
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

def feeds(L, R, N=1):
    f32, i8 = np.float32, np.int8
    return dict(x=np.ones((1, L, 1), f32), z=np.ones((1, L, 1), i8), conv_state=np.zeros((2, 1, 1, 3), f32),
                ssm_state=np.zeros((2, 1, 1, N), f32), conv_w=np.ones((1, 4), f32), conv_b=np.zeros(1, f32),
                x_proj_w=np.ones((R + 2 * N, 1), i8), x_proj_scale=np.full(R + 2 * N, 0.01, f32),
                dt_proj_w=np.ones((R, 1), i8), dt_proj_scale=np.full(1, 0.01, f32), delta_bias=np.zeros(1, f32),
                A=-np.ones((1, N), f32), D=np.ones(1, f32), gate_scale=np.ones(1, f32))

try:
    sess.run(None, feeds(L, R))
    print("NO ERROR")
except Exception as e:
    print("ERROR", type(e).__name__, str(e).splitlines()[0])
y = sess.run(None, feeds(3, 2))[0]          # the same session, a small call: the process and ORT survive
print("SURVIVED", bool(np.isfinite(y).all()), y.shape)
"""


@needs_lib
@pytest.mark.parametrize("case", ["larger-than-memory", "allocation-fails"])
def test_scratch_that_cannot_be_had_is_an_ort_error(case, tmp_path):
    """The op's scratch is b * L * (2 Di + 2 N + dt_rank) values: a few MiB of real tensors with a huge
    dt_rank (x_proj_w [dt_rank + 2N, 1]) ask for far more. Larger than the machine's memory (1 TiB here) it
    is refused before allocating; smaller, but more than the process may map (RLIMIT_AS, so that the
    allocation really fails), the failure is caught. Either way one ORT error naming the sizes, and the
    same session then runs a small call: nothing aborts. Run in a child process with its address space
    limited, so that a regression cannot take the test runner down."""
    import subprocess
    import sys

    from onnx import TensorProto as T
    from onnx import helper as h

    from mq_deploy.export.scan_op import DOMAIN
    from mq_deploy.export.state_update_op import INPUTS, OP_UPDATE, OUTPUTS

    int8 = {"z", "x_proj_w", "dt_proj_w"}
    ranks = dict(x=3, z=3, conv_state=4, ssm_state=4, conv_w=2, conv_b=1, x_proj_w=2, x_proj_scale=1, dt_proj_w=2,
                 dt_proj_scale=1, delta_bias=1, A=2, D=1, gate_scale=1)
    node = h.make_node(OP_UPDATE, list(INPUTS), list(OUTPUTS), domain=DOMAIN, layer=1, conv_scale=0.01, x_scale=0.01,
                       dt_low_scale=0.01, delta_scale=0.01, B_scale=0.01, C_scale=0.01, z_scale=0.01)
    graph = h.make_graph([node], "update", [h.make_tensor_value_info(k, T.INT8 if k in int8 else T.FLOAT,
                                                                     [f"{k}_{i}" for i in range(ranks[k])])
                                            for k in INPUTS],
                         [h.make_tensor_value_info(k, T.FLOAT, None) for k in OUTPUTS])
    model = tmp_path / "update.onnx"
    model.write_bytes(h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)],
                                   ir_version=10).SerializeToString())
    L = 1 << 20                                     # x: 4 MiB
    R, limit = (1 << 20, 3 << 30) if case == "larger-than-memory" else (1 << 11, 3 << 29)
    # scratch: 1 TiB (refused before allocating), or 2.1 GB against a 1.5 GiB address-space limit
    r = subprocess.run([sys.executable, "-c", _RUN_HUGE, str(model), LIB, str(L), str(R), str(limit)],
                       capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
    err = next(line for line in r.stdout.splitlines() if line.startswith(("ERROR", "NO ERROR")))
    assert err.startswith("ERROR") and "mq::SelectiveStateUpdate: " in err and f"dt_rank {R}" in err
    want = "more than this machine's" if case == "larger-than-memory" else "out of memory allocating"
    assert want in err
    assert "SURVIVED True (1, 3, 1)" in r.stdout
