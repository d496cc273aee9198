"""The C++ CPU scan (libmq_scan_cpu.so through ctypes) against selective_scan_int8_ref, its contract.

Tolerances, stated as rel_err (max |diff| / max |ref|):
  float32 output: 2e-5. Both sides compute in float32 from the same int8 codes; they differ in
  summation order over N (the reference's torch.sum vs a running sum), in exp (the library's
  degree-6 exp2 polynomial, relative error < 1e-7, vs libm/Sleef) and in softplus/sigmoid ulps. These
  are a few float32 ulps per step; the recurrence decays (A < 0), so they do not grow with L.
  float16 output: the float32 bound plus half an fp16 ulp of each element (the final rounding).
"""

import ctypes
import os

import pytest
import torch

from mq_deploy.errors import MQUserError
from mq_deploy.ops import native
from mq_deploy.ops.selective_scan import selective_scan_int8_ref

from conftest import rel_err
from helpers import decode_steps, make, q8, with_edges

# CI installs with MQ_REQUIRE_NATIVE=1: there a missing library fails the tests instead of skipping them
needs_lib = pytest.mark.skipif(os.environ.get("MQ_REQUIRE_NATIVE") != "1" and not native.available(),
                               reason=f"{native.unavailable_reason()}")
PLUGIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins", "selective_scan")

TOL = 2e-5


def check(got, want, tol=TOL, what="y"):
    e = rel_err(got.float(), want)
    print(f"{what}: rel err {e:.2e} (max |ref| {want.abs().max().item():.3g}, tol {tol:.0e})")
    assert e < tol


# (b, L, d, n): L = 1 and lengths that are multiples of nothing; d odd, below and above the CPU
# channel block (16); N = 16 (Mamba1) and 64, a non-power-of-two, and the maximum 256
SHAPES = [(1, 1, 1, 16), (2, 37, 33, 16), (3, 131, 17, 64), (1, 300, 40, 16), (2, 9, 5, 7), (1, 6, 3, 256)]


@needs_lib
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b%d-L%d-d%d-n%d" % s)
@pytest.mark.parametrize("z,gate,h0", [(True, False, False), (False, False, True), (True, True, True)],
                         ids=["silu", "noz-h0", "gate-h0"])
def test_matches_reference(shape, z, gate, h0):
    kw = make(*shape, z=z, gate=gate, h0=h0)
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, h = native.selective_scan_int8_native(**kw, return_last_state=True)
    assert y.dtype == torch.float32 and y.shape == want_y.shape and h.shape == want_h.shape
    check(y, want_y)
    check(h, want_h, what="h_last")
    y_only = native.selective_scan_int8_native(**kw)
    assert torch.equal(y_only, y)


# partial and full 16-channel blocks, N = 16, an odd N and the maximum; b * L * d * N above 65536 in the
# last two, so the library runs them on two threads
EDGE_SHAPES = [(2, 37, 33, 16), (1, 50, 17, 7), (3, 60, 40, 64), (1, 70, 5, 256)]


@needs_lib
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "b%d-L%d-d%d-n%d" % s)
def test_edge_codes_and_large_dt(shape):
    """-128 in every int8 input and delta + delta_bias > 20 on every third channel (softplus's linear
    range), against the reference; the large-dt channels (|y| in the thousands) and the others are checked
    apart, so that neither hides the other's error. Same tolerance: nothing saturates in float32."""
    kw, big = with_edges(make(*shape, gate=True, h0=True, seed=41))
    v = kw["qdelta"].float() * kw["delta_scale"] + kw["delta_bias"]
    assert all((kw[k] == -128).any() for k in ("qx", "qdelta", "qB", "qC", "qz"))
    assert (v[..., big] > 20).all() and (v[..., ~big] < 20).all()
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, h = native.selective_scan_int8_native(**kw, return_last_state=True, num_threads=2)
    check(y[..., big], want_y[..., big], what="y, delta + bias > 20")
    check(y[..., ~big], want_y[..., ~big], what="y, other channels")
    check(h[:, big], want_h[:, big], what="h_last, delta + bias > 20")
    check(h[:, ~big], want_h[:, ~big], what="h_last, other channels")


@needs_lib
def test_fp16_output():
    kw = make(2, 45, 24, 16, gate=True, h0=True)
    want = selective_scan_int8_ref(**kw)
    y = native.selective_scan_int8_native(**kw, out_dtype=torch.float16)
    assert y.dtype == torch.float16
    err = (y.float() - want).abs()
    bound = want.abs() * 2.0**-11 * 1.01 + TOL * want.abs().max()
    print(f"fp16: max |diff| {err.max().item():.3g}, max |ref| {want.abs().max().item():.3g}")
    assert (err <= bound).all()


@needs_lib
def test_threads_do_not_change_the_result():
    kw = make(3, 50, 70, 16, h0=True)
    one = native.selective_scan_int8_native(**kw, num_threads=1, return_last_state=True)
    many = native.selective_scan_int8_native(**kw, num_threads=7, return_last_state=True)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_lib
def test_strided_inputs_without_copies():
    """x, delta, z as column slices of wider [b, L, *] tensors and B, C as slices of one x_proj-like
    output: the strides go to the kernel as they are."""
    g = torch.Generator().manual_seed(3)
    b, L, d, n, r = 2, 29, 21, 16, 5
    xdz = q8(b, L, 3 * d + 2, g=g)
    dbc = q8(b, L, r + 2 * n, g=g)
    kw = make(b, L, d, n, gate=True, h0=True, seed=3)
    kw.update(qx=xdz[..., :d], qdelta=xdz[..., d:2 * d], qz=xdz[..., 2 * d + 1:3 * d + 1],
              qB=dbc[..., r:r + n], qC=dbc[..., r + n:])
    assert not kw["qx"].is_contiguous() and not kw["qB"].is_contiguous()
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    y, h = native.selective_scan_int8_native(**kw, return_last_state=True)
    check(y, want_y)
    check(h, want_h, what="h_last")
    # and a transposed (d not contiguous) input falls back to a copy with the same answer
    kw["qx"] = kw["qx"].transpose(1, 2).contiguous().transpose(1, 2)
    check(native.selective_scan_int8_native(**kw), want_y)


@needs_lib
def test_decode_steps_in_place_equal_the_full_scan():
    """seqlen == 1 with h_last aliasing h0 (the decode step), run L times, equals one scan of L."""
    b, L, d, n = 2, 12, 19, 16
    kw = make(b, L, d, n, gate=True, h0=True, seed=5)
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    def run_step(step, state):
        y, h = native.selective_scan_int8_native(**step, out_state=state)
        assert h is state
        return y

    y, state = decode_steps(kw, run_step)
    check(y, want_y)
    check(state, want_h, what="state")


@needs_lib
def test_argument_errors_are_user_errors():
    kw = make(1, 4, 3, 16)
    with pytest.raises(MQUserError, match="softplus"):
        native.selective_scan_int8_native(**kw, delta_softplus=False)
    with pytest.raises(ValueError, match="int8"):
        native.selective_scan_int8_native(**dict(kw, qx=kw["qx"].float()))
    with pytest.raises(MQUserError, match="dstate=300"):
        native.selective_scan_int8_native(**make(1, 2, 3, 300))


def _params(**over):
    """A valid MQScanParams over small live buffers (returned to keep them alive), then overrides."""
    b, L, d, n = 1, 3, 4, 16
    bufs = dict(x=torch.zeros(b, L, d, dtype=torch.int8), B=torch.zeros(b, L, n, dtype=torch.int8),
                A=-torch.ones(d, n), y=torch.empty(b, L, d))
    p = native.MQScanParams(batch=b, seqlen=L, dim=d, dstate=n, x_scale=1, delta_scale=1, B_scale=1, C_scale=1)
    p.x = p.delta = bufs["x"].data_ptr()
    p.B = p.C = bufs["B"].data_ptr()
    p.A, p.y = bufs["A"].data_ptr(), bufs["y"].data_ptr()
    native.load_library().mq_scan_set_contiguous_strides(ctypes.byref(p))
    for k, v in over.items():
        setattr(p, k, v)
    return p, bufs


@pytest.mark.parametrize("over,message", [
    (dict(dstate=257), "dstate=257 exceeds"),
    (dict(seqlen=0), "sizes must be > 0"),
    (dict(x=None), "required pointer x is NULL"),
    (dict(C=None), "required pointer C is NULL"),
    (dict(y=None), "required pointer y is NULL"),
    (dict(A=None), "required pointer A is NULL"),
    (dict(out_fp16=2), "out_fp16"),
    (dict(x_l_stride=2), "l strides"),
], ids=lambda v: str(v)[:24])
@needs_lib
def test_c_abi_rejects_bad_params_with_a_message(over, message):
    lib = native.load_library()
    p, _keep = _params(**over)
    assert lib.mq_scan_validate(ctypes.byref(p)) == native.ERR_INVALID
    assert message in native.last_error(lib)
    assert lib.mq_scan_cpu(ctypes.byref(p), 1) == native.ERR_INVALID    # validated, not run
    assert message in native.last_error(lib)
    good, _keep2 = _params()
    assert lib.mq_scan_cpu(ctypes.byref(good), 1) == 0
    assert lib.mq_scan_validate(None) == native.ERR_INVALID and "NULL" in native.last_error(lib)


def test_missing_library_names_the_path_and_the_fix(monkeypatch, tmp_path):
    missing = str(tmp_path / "libnothere.so")
    monkeypatch.setenv("MQ_SCAN_LIB", missing)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_error", None)
    assert not native.available()
    with pytest.raises(MQUserError, match="libnothere.so.*--build"):
        native.selective_scan_int8_native(**make(1, 2, 3, 16))


def test_op_yaml_agrees_with_the_plugin_yaml():
    """selective_scan.yaml (the op) and trt/SelectiveScan_PluginConfig.yaml (the plugin) describe one op."""
    yaml = pytest.importorskip("yaml")
    plugin_yaml = os.path.join(PLUGIN_DIR, "trt", "SelectiveScan_PluginConfig.yaml")
    if not os.path.exists(plugin_yaml):
        pytest.skip("no TensorRT plugin YAML in this checkout")
    with open(os.path.join(PLUGIN_DIR, "selective_scan.yaml")) as f:
        op = yaml.safe_load(f)
    with open(plugin_yaml) as f:
        plugin = yaml.safe_load(f)
    for k in ("name", "namespace", "interface"):
        assert op[k] == plugin[k], k
    a, b = op["versions"]["1"], plugin["versions"]["1"]
    for k in ("inputs", "outputs", "input_dims", "input_dim_constraints", "output_dims", "attributes",
              "attribute_types", "attribute_length", "attribute_options"):
        assert a[k] == b[k], k
    assert a["input_dim_constraints"][-1] == f"A_1 <= {native.MAX_DSTATE}"


# A C program fills every input of the ABI (D, z, delta_bias, gate_scale and h0 included) from formulas that
# c_program_inputs() repeats in Python: int8 codes over the whole range (-128 first), dyadic floats (exact in
# both languages) and one channel with delta_bias 24 (softplus's linear range). It prints y and h_last.
C_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include "mq_selective_scan.h"
enum { NB = 2, NL = 3, ND = 5, NN = 4 };
static int8_t code(int i, int a, int c) { return (int8_t)((i * a + c) % 256 - 128); }
int main(void) {
  int8_t x[NB * NL * ND], dl[NB * NL * ND], z[NB * NL * ND], B[NB * NL * NN], C[NB * NL * NN];
  float A[ND * NN], D[ND], bias[ND], gs[ND], h0[NB * ND * NN], y[NB * NL * ND], h[NB * ND * NN];
  int i;
  for (i = 0; i < NB * NL * ND; ++i) { x[i] = code(i, 37, 0); dl[i] = code(i, 53, 11); z[i] = code(i, 13, 7); }
  for (i = 0; i < NB * NL * NN; ++i) { B[i] = code(i, 29, 5); C[i] = code(i, 71, 3); }
  for (i = 0; i < ND * NN; ++i) A[i] = -(float)(i + 1) / 8.0f;
  for (i = 0; i < ND; ++i) { D[i] = (float)(i - 2) / 4.0f; bias[i] = i == 0 ? 24.0f : (float)(i - 4) / 4.0f; gs[i] = (float)(i + 2) / 4.0f; }
  for (i = 0; i < NB * ND * NN; ++i) h0[i] = (float)(i % 17 - 8) / 16.0f;
  MQScanParams p;
  memset(&p, 0, sizeof p);
  p.batch = NB; p.seqlen = NL; p.dim = ND; p.dstate = NN;
  p.x = x; p.delta = dl; p.B = B; p.C = C; p.z = z;
  p.x_scale = 0.02f; p.delta_scale = 0.015f; p.B_scale = 0.03f; p.C_scale = 0.025f; p.z_scale = 0.03f;
  p.A = A; p.D = D; p.delta_bias = bias; p.gate_scale = gs; p.h0 = h0; p.y = y; p.h_last = h;
  if (mq_scan_validate(&p) != MQ_SCAN_ERR_INVALID) return 2;          /* strides not set yet */
  if (strstr(mq_scan_last_error(), "strides") == NULL) return 3;
  mq_scan_set_contiguous_strides(&p);
  if (mq_scan_cpu(&p, 2) != MQ_SCAN_OK) { puts(mq_scan_last_error()); return 4; }
  printf("%s\n", mq_scan_version());
  for (i = 0; i < NB * NL * ND; ++i) printf("%.9g\n", y[i]);
  for (i = 0; i < NB * ND * NN; ++i) printf("%.9g\n", h[i]);
  return 0;
}
"""


def c_program_inputs():
    """The C program's inputs, computed the same way, as selective_scan_int8_ref arguments."""
    b, L, d, n = 2, 3, 5, 4

    def code(count, a, c):
        return torch.tensor([(i * a + c) % 256 - 128 for i in range(count)], dtype=torch.int8)

    i = torch.arange(d, dtype=torch.float32)
    bias = (i - 4) / 4
    bias[0] = 24.0
    return dict(qx=code(b * L * d, 37, 0).view(b, L, d), x_scale=0.02,
                qdelta=code(b * L * d, 53, 11).view(b, L, d), delta_scale=0.015,
                A=-(torch.arange(d * n, dtype=torch.float32) + 1).view(d, n) / 8,
                qB=code(b * L * n, 29, 5).view(b, L, n), B_scale=0.03, qC=code(b * L * n, 71, 3).view(b, L, n),
                C_scale=0.025, D=(i - 2) / 4, qz=code(b * L * d, 13, 7).view(b, L, d), z_scale=0.03,
                delta_bias=bias, gate_scale=(i + 2) / 4,
                initial_state=((torch.arange(b * d * n) % 17 - 8) / 16).float().view(b, d, n))


@needs_lib
def test_header_is_a_c_abi(tmp_path):
    """The header compiles as C99 and a C program drives the library through it."""
    import shutil
    import subprocess
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "abi.c"
    src.write_text(C_PROGRAM)
    lib = native.library_path()
    exe = tmp_path / "abi"
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I", os.path.join(PLUGIN_DIR, "include"),
                    str(src), lib, f"-Wl,-rpath,{os.path.dirname(lib)}", "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    version, *values = out.stdout.split()
    assert version == native.load_library().mq_scan_version().decode()
    kw = c_program_inputs()
    assert (kw["qx"] == -128).any() and (kw["qdelta"][..., 0] * kw["delta_scale"] + kw["delta_bias"][0] > 20).all()
    want_y, want_h = selective_scan_int8_ref(**kw, return_last_state=True)
    values = torch.tensor([float(v) for v in values])
    assert values.numel() == want_y.numel() + want_h.numel()
    # %.9g round-trips float32 exactly, so the bound is the library's (TOL); channel 0 (dt > 20) apart
    y, h = values[:want_y.numel()].view_as(want_y), values[want_y.numel():].view_as(want_h)
    check(y[..., 0], want_y[..., 0], what="C program y, channel 0 (dt > 20)")
    check(y[..., 1:], want_y[..., 1:], what="C program y, channels 1-4")
    check(h, want_h, what="C program h_last")


@needs_lib
def test_scalar_gate_scale_broadcasts_like_the_reference():
    """A one-element or 0-d gate_scale is valid for the reference (broadcast); the kernel reads one
    factor per channel, so the wrapper expands it instead of letting C read past its end."""
    kw = make(2, 20, 24, 16, gate=True, seed=21)
    for gs in (torch.tensor([0.7]), torch.tensor(0.7)):
        k = dict(kw, gate_scale=gs)
        check(native.selective_scan_int8_native(**k), selective_scan_int8_ref(**k))
    with pytest.raises(MQUserError, match="gate_scale must have shape"):
        native.selective_scan_int8_native(**dict(kw, gate_scale=torch.ones(5)))


@needs_lib
def test_time_major_and_broadcast_views_are_copied():
    """Views whose rows overlap across batch (time-major storage, expand) are read after a copy."""
    kw = make(3, 9, 16, 16, seed=22)
    want = selective_scan_int8_ref(**kw)
    tm = {k: (kw[k].transpose(0, 1).contiguous().transpose(0, 1) if k in ("qx", "qdelta", "qz", "qB", "qC")
              else kw[k]) for k in kw}
    check(native.selective_scan_int8_native(**tm), want)
    one = make(1, 9, 16, 16, seed=23)
    bc = {k: (one[k].expand(3, -1, -1) if k in ("qx", "qdelta", "qz", "qB", "qC") else one[k]) for k in one}
    check(native.selective_scan_int8_native(**bc), selective_scan_int8_ref(**{k: (v.contiguous() if torch.is_tensor(v)
                                                                                  else v) for k, v in bc.items()}))
