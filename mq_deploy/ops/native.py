"""ctypes binding of the native int8 scans (libmq_scan_cpu.so), same signatures as the references.

`selective_scan_int8_native` takes exactly the arguments of `selective_scan_int8_ref` (plus
`num_threads`, `out_dtype` and `out_state`) and runs plugins/selective_scan's C++ implementation on CPU
tensors; `ssd_scan_int8_native` / `ssd_scan_native` do the same for Mamba2's `ssd_scan_int8_ref` /
`ssd_scan_ref` (mq_ssd.h). The library is loaded lazily from $MQ_SCAN_LIB, else from mq_deploy/_native/, where
`pip install` puts it. Rebuild it from a source checkout with

    python -m mq_deploy.ops.native --build          # add --cuda for libmq_scan_cuda.so as well
"""

from __future__ import annotations

import ctypes
import os
import sys

from mq_deploy.errors import MQInternalError, MQUserError

LIB_NAME = "libmq_scan_cpu.so"
ORT_LIB_NAME = "libmq_scan_ort.so"   # mq::SelectiveScan / mq::SSDScan custom ops for ONNX Runtime, built beside it
ORT_LIB_ENV = "MQ_SCAN_ORT_LIB"
NATIVE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_native")
_SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(NATIVE_DIR)), "plugins", "selective_scan")
BUILD_HINT = "python -m mq_deploy.ops.native --build   (from a source checkout; or reinstall: pip install -e .)"

ERR_INVALID = 1
MAX_DSTATE = 256

_p = ctypes.c_void_p


class MQScanParams(ctypes.Structure):
    """Mirror of MQScanParams in plugins/selective_scan/include/mq_selective_scan.h (same field order)."""
    _fields_ = [
        ("batch", ctypes.c_int64), ("seqlen", ctypes.c_int64), ("dim", ctypes.c_int64), ("dstate", ctypes.c_int64),
        ("x", _p), ("delta", _p), ("B", _p), ("C", _p), ("z", _p),
        ("x_scale", ctypes.c_float), ("delta_scale", ctypes.c_float), ("B_scale", ctypes.c_float),
        ("C_scale", ctypes.c_float), ("z_scale", ctypes.c_float),
        ("A", _p), ("D", _p), ("delta_bias", _p), ("gate_scale", _p), ("h0", _p),
        ("y", _p), ("h_last", _p),
        ("out_fp16", ctypes.c_int32),
        ("x_batch_stride", ctypes.c_int64), ("x_l_stride", ctypes.c_int64),
        ("bc_batch_stride", ctypes.c_int64), ("bc_l_stride", ctypes.c_int64),
        ("y_batch_stride", ctypes.c_int64), ("y_l_stride", ctypes.c_int64),
    ]


_lib = None
_load_error = None


def library_path() -> str:
    return os.environ.get("MQ_SCAN_LIB") or os.path.join(NATIVE_DIR, LIB_NAME)


def ort_library_path() -> str:
    """Where the ONNX Runtime custom-op library is looked for: $MQ_SCAN_ORT_LIB, else mq_deploy/_native/."""
    return os.environ.get(ORT_LIB_ENV) or os.path.join(NATIVE_DIR, ORT_LIB_NAME)


def ort_library() -> str | None:
    """The custom-op library's path when it exists (what the ORT runner registers by default), else None.
    Torch-free: this module imports torch only where a scan runs."""
    path = ort_library_path()
    return path if os.path.isfile(path) else None


def _declare(lib):
    P = ctypes.POINTER(MQScanParams)
    if hasattr(lib, "mq_scan_cpu"):             # the CUDA library has the shared entry points only
        lib.mq_scan_cpu.argtypes = [P, ctypes.c_int]
        lib.mq_scan_cpu.restype = ctypes.c_int
    lib.mq_scan_validate.argtypes = [P]
    lib.mq_scan_validate.restype = ctypes.c_int
    lib.mq_scan_set_contiguous_strides.argtypes = [P]
    lib.mq_scan_set_contiguous_strides.restype = None
    lib.mq_scan_last_error.argtypes = []
    lib.mq_scan_last_error.restype = ctypes.c_char_p
    lib.mq_scan_version.argtypes = []
    lib.mq_scan_version.restype = ctypes.c_char_p
    if hasattr(lib, "mq_ssd_validate"):         # libraries built before mq::SSDScan have the Mamba1 scan only
        _declare_ssd(lib)
    return lib


def load_library(path: str | None = None):
    """The loaded CPU library; MQUserError naming the path and the fix when it is missing."""
    global _lib, _load_error
    if path is not None:
        return _declare(ctypes.CDLL(path))
    if _lib is None and _load_error is None:
        where = library_path()
        if not os.path.exists(where):
            _load_error = f"native selective scan library not found at {where}; build it with: {BUILD_HINT}"
        else:
            try:
                _lib = _declare(ctypes.CDLL(where))
            except OSError as e:
                _load_error = f"cannot load {where}: {e}; rebuild it with: {BUILD_HINT}"
    if _lib is None:
        raise MQUserError(_load_error)
    return _lib


def available() -> bool:
    try:
        load_library()
        return True
    except MQUserError:
        return False


def unavailable_reason() -> str | None:
    return None if available() else _load_error


def last_error(lib=None) -> str:
    return (lib or load_library()).mq_scan_last_error().decode(errors="replace")


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _f32(t, name, device):
    import torch
    if t is None:
        return None
    if t.device != device:
        raise MQUserError(f"{name} must be on {device} like x, got {t.device}")
    return t.detach().to(torch.float32).contiguous()


def _rows(tensors, width):
    """Tensors [b, L, width] sharing one (batch, l) stride pair with the last dim contiguous, as the
    kernel reads them; copies to contiguous when they do not."""
    live = [t for t in tensors if t is not None]
    strides = {t.stride() for t in live}
    b, seqlen = live[0].shape[0], live[0].shape[1]
    bs, ls = live[0].stride(0), live[0].stride(1)
    # the kernel needs rows that do not overlap (no time-major or broadcast views): else copy
    overlapping = (seqlen > 1 and ls < width) or (b > 1 and bs < ls * (seqlen - 1) + width)
    if len(strides) != 1 or (live[0].stride(2) != 1 and width > 1) or overlapping:
        tensors = [None if t is None else t.contiguous() for t in tensors]
        live = [t for t in tensors if t is not None]
        bs, ls = live[0].stride(0), live[0].stride(1)
    # strides of size-1 dims are arbitrary in torch and never used by the kernel: give valid ones
    ls = width if seqlen == 1 else ls
    bs = seqlen * ls if b == 1 else bs
    return tensors, bs, ls


def _prepare(qx, x_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz, z_scale, delta_bias,
             delta_softplus, initial_state, return_last_state, gate_scale, out_dtype, out_state, device_type):
    """Checks the arguments and fills MQScanParams. Returns (params, y, h_last, tensors to keep alive)."""
    import torch

    from mq_deploy.ops.selective_scan import _check_shapes
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    for name, q in (("x", qx), ("delta", qdelta), ("B", qB), ("C", qC), ("z", qz)):
        if q is not None:
            if q.dtype != torch.int8:
                raise MQUserError(f"{name} must be int8, got {q.dtype}")
            if q.device.type != device_type or q.device != qx.device:
                raise MQUserError(f"{name} must be a {device_type} tensor on x's device, got {q.device}")
    if (qz is None) != (z_scale is None):
        raise MQUserError("z and z_scale go together")
    if not delta_softplus:
        raise MQUserError("the native int8 scan always applies softplus to delta (mq::SelectiveScan semantics)")
    if out_dtype not in (torch.float32, torch.float16):
        raise MQUserError(f"out_dtype must be torch.float32 or torch.float16, got {out_dtype}")
    _check_shapes(qx, qdelta, A, qB, qC, D, qz, delta_bias, initial_state)
    bsz, seqlen, dim = qx.shape
    n = A.shape[1]
    if n > MAX_DSTATE:
        raise MQUserError(f"dstate={n} exceeds the native scan's maximum {MAX_DSTATE}")
    dev = qx.device

    (qx, qdelta, qz), x_bs, x_ls = _rows([qx, qdelta, qz], dim)
    (qB, qC), bc_bs, bc_ls = _rows([qB, qC], n)
    A, D, delta_bias = _f32(A, "A", dev), _f32(D, "D", dev), _f32(delta_bias, "delta_bias", dev)
    if gate_scale is not None and qz is not None:
        if gate_scale.numel() not in (1, dim) or (gate_scale.dim() > 1):
            raise MQUserError(f"gate_scale must have shape [{dim}] (or be a scalar), got {list(gate_scale.shape)}")
        gate_scale = gate_scale.reshape(-1).expand(dim)      # the kernel reads one factor per channel
    gate_scale = _f32(gate_scale, "gate_scale", dev) if qz is not None else None
    h0 = _f32(initial_state, "initial_state", dev)
    if out_state is not None:
        if (out_state.dtype != torch.float32 or not out_state.is_contiguous() or out_state.device != dev
                or tuple(out_state.shape) != (bsz, dim, n)):
            raise MQUserError(f"out_state must be a contiguous float32 tensor [{bsz}, {dim}, {n}] on {dev}")
        if initial_state is not None and out_state.data_ptr() == initial_state.data_ptr():
            h0 = out_state          # in place: each state element is read before it is written
    y = torch.empty(bsz, seqlen, dim, dtype=out_dtype, device=dev)
    h_last = out_state if out_state is not None else (
        torch.empty(bsz, dim, n, dtype=torch.float32, device=dev) if return_last_state else None)

    p = MQScanParams(
        batch=bsz, seqlen=seqlen, dim=dim, dstate=n,
        x=_ptr(qx), delta=_ptr(qdelta), B=_ptr(qB), C=_ptr(qC), z=_ptr(qz),
        x_scale=float(x_scale), delta_scale=float(delta_scale), B_scale=float(B_scale), C_scale=float(C_scale),
        z_scale=0.0 if z_scale is None else float(z_scale),
        A=_ptr(A), D=_ptr(D), delta_bias=_ptr(delta_bias), gate_scale=_ptr(gate_scale), h0=_ptr(h0),
        y=_ptr(y), h_last=_ptr(h_last), out_fp16=int(out_dtype == torch.float16),
        x_batch_stride=x_bs, x_l_stride=x_ls, bc_batch_stride=bc_bs, bc_l_stride=bc_ls,
        y_batch_stride=seqlen * dim, y_l_stride=dim)
    keep = (qx, qdelta, qz, qB, qC, A, D, delta_bias, gate_scale, h0)
    return p, y, h_last, keep


def _raise(lib, rc, what):
    msg = last_error(lib)
    raise (MQUserError if rc == ERR_INVALID else MQInternalError)(f"{what}: {msg} (code {rc})")


def selective_scan_int8_native(qx, x_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None, qz=None,
                               z_scale=None, delta_bias=None, delta_softplus=True, initial_state=None,
                               return_last_state=False, gate_scale=None, *, num_threads=0,
                               out_dtype=None, out_state=None):
    """`selective_scan_int8_ref` on the C++ CPU library (CPU tensors). Extra keywords:

    num_threads  worker threads (<= 0: all cores)
    out_dtype    torch.float32 (None: the default) or torch.float16 (the op's out_dtype attribute)
    out_state    a float32 contiguous [b, Di, N] tensor to write the last state into; may be
                 initial_state itself (an in-place decode step). Implies return_last_state.
    """
    p, y, h_last, _keep = _prepare(qx, x_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz, z_scale,
                                   delta_bias, delta_softplus, initial_state, return_last_state, gate_scale,
                                   out_dtype, out_state, "cpu")
    lib = load_library()
    rc = lib.mq_scan_cpu(ctypes.byref(p), int(num_threads))
    if rc != 0:
        _raise(lib, rc, "mq_scan_cpu")
    return (y, h_last) if (return_last_state or out_state is not None) else y


# --- mq::SSDScan (Mamba2), same libraries -------------------------------------------------------------

class MQSSDParams(ctypes.Structure):
    """Mirror of MQSSDParams in plugins/selective_scan/include/mq_ssd.h (same field order)."""
    _fields_ = [
        ("batch", ctypes.c_int64), ("seqlen", ctypes.c_int64), ("heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64), ("groups", ctypes.c_int64), ("dstate", ctypes.c_int64),
        ("in_float", ctypes.c_int32),
        ("x", _p), ("dt", _p), ("B", _p), ("C", _p),
        ("x_scale", ctypes.c_float), ("dt_scale", ctypes.c_float), ("B_scale", ctypes.c_float),
        ("C_scale", ctypes.c_float),
        ("x_scales", _p), ("dt_scales", _p), ("B_scales", _p), ("C_scales", _p),
        ("A", _p), ("D", _p), ("dt_bias", _p), ("dt_min", ctypes.c_float), ("dt_max", ctypes.c_float),
        ("h0", _p), ("y", _p), ("h_last", _p),
        ("x_batch_stride", ctypes.c_int64), ("x_l_stride", ctypes.c_int64),
        ("dt_batch_stride", ctypes.c_int64), ("dt_l_stride", ctypes.c_int64),
        ("bc_batch_stride", ctypes.c_int64), ("bc_l_stride", ctypes.c_int64),
        ("y_batch_stride", ctypes.c_int64), ("y_l_stride", ctypes.c_int64),
    ]


def _declare_ssd(lib):
    P = ctypes.POINTER(MQSSDParams)
    names = ["mq_ssd_validate"] + [n for n in ("mq_ssd_cpu",) if hasattr(lib, n)]
    for n in names:
        fn = getattr(lib, n)
        fn.argtypes = [P] if n == "mq_ssd_validate" else [P, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.mq_ssd_set_contiguous_strides.argtypes = [P]
    lib.mq_ssd_set_contiguous_strides.restype = None
    if hasattr(lib, "mq_ssd_cuda"):
        for fn in (lib.mq_ssd_cuda, lib.mq_ssd_step_cuda):
            fn.argtypes = [P, ctypes.c_void_p]
            fn.restype = ctypes.c_int
        lib.mq_ssd_cuda_workspace_size.argtypes = [P]
        lib.mq_ssd_cuda_workspace_size.restype = ctypes.c_size_t
        lib.mq_ssd_cuda_ws.argtypes = [P, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.mq_ssd_cuda_ws.restype = ctypes.c_int
    return lib


def _ssd_scale(scale, channels, name, device):
    """(per-tensor value, per-channel tensor or None) of a scale given as a number or one value per channel."""
    import torch

    t = torch.as_tensor(scale, dtype=torch.float32)
    if t.numel() == 1:
        return float(t.reshape(())), None
    if t.dim() != 1 or t.numel() != channels:
        raise MQUserError(f"{name} must be one value or {channels} (one per channel of the last axis), "
                          f"got shape {list(t.shape)}")
    return 1.0, t.to(device).contiguous()


def _ssd_prepare(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state, return_last_state, scales, out_state,
                 device_type):
    """Checks the arguments and fills MQSSDParams. x [b, L, H, P], dt [b, L, H], B, C [b, L, G, N], int8 with
    `scales` {x, dt, B, C} or float (scales None). Returns (params, y, h_last, tensors to keep alive)."""
    import math

    import torch

    from mq_deploy.ops.ssd import _check
    _check(x, dt, A, B, C, D, dt_bias, initial_state)
    in_float = scales is None
    want = torch.float32 if in_float else torch.int8
    for name, t in (("x", x), ("dt", dt), ("B", B), ("C", C)):
        if not in_float and t.dtype != want:            # float inputs of any float dtype are converted below
            raise MQUserError(f"{name} must be int8, got {t.dtype}")
        if t.device.type != device_type or t.device != x.device:
            raise MQUserError(f"{name} must be a {device_type} tensor on x's device, got {t.device}")
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if N > MAX_DSTATE:
        raise MQUserError(f"d_state={N} exceeds the native SSD scan's maximum {MAX_DSTATE}")
    dev = x.device
    x, dt, B, C = (t.detach().to(want).contiguous() for t in (x, dt, B, C))
    A, D, dt_bias = _f32(A, "A", dev), _f32(D, "D", dev), _f32(dt_bias, "dt_bias", dev)
    lo, hi = dt_limit
    lo = 0.0 if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    h0 = _f32(initial_state, "initial_state", dev)
    if out_state is not None:
        if (out_state.dtype != torch.float32 or not out_state.is_contiguous() or out_state.device != dev
                or tuple(out_state.shape) != (b, H, P, N)):
            raise MQUserError(f"out_state must be a contiguous float32 tensor [{b}, {H}, {P}, {N}] on {dev}")
        if initial_state is not None and out_state.data_ptr() == initial_state.data_ptr():
            h0 = out_state          # in place: each state element is read before it is written
    y = torch.empty(b, L, H, P, dtype=torch.float32, device=dev)
    h_last = out_state if out_state is not None else (
        torch.empty(b, H, P, N, dtype=torch.float32, device=dev) if return_last_state else None)
    p = MQSSDParams(batch=b, seqlen=L, heads=H, head_dim=P, groups=G, dstate=N, in_float=int(in_float),
                    x=_ptr(x), dt=_ptr(dt), B=_ptr(B), C=_ptr(C), A=_ptr(A), D=_ptr(D), dt_bias=_ptr(dt_bias),
                    dt_min=lo, dt_max=hi, h0=_ptr(h0), y=_ptr(y), h_last=_ptr(h_last),
                    x_batch_stride=L * H * P, x_l_stride=H * P, dt_batch_stride=L * H, dt_l_stride=H,
                    bc_batch_stride=L * G * N, bc_l_stride=G * N, y_batch_stride=L * H * P, y_l_stride=H * P)
    keep = [x, dt, B, C, A, D, dt_bias, h0]
    if not in_float:
        for name, channels in (("x", H * P), ("dt", H), ("B", G * N), ("C", G * N)):
            value, per_channel = _ssd_scale(scales[name], channels, f"{name}_scale", dev)
            setattr(p, f"{name}_scale", value)
            setattr(p, f"{name}_scales", _ptr(per_channel))
            keep.append(per_channel)
    return p, y, h_last, keep


def ssd_scan_int8_native(qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, D=None, dt_bias=None,
                         dt_limit=(0.0, None), initial_state=None, return_last_state=False, *, num_threads=0,
                         out_state=None):
    """`mq_deploy.ops.ssd.ssd_scan_int8_ref` on the C++ CPU library (CPU tensors). Extra keywords:
    num_threads (<= 0: all cores); out_state, a contiguous float32 [b, H, P, N] tensor to write the last state
    into (may be initial_state itself: an in-place decode step; implies return_last_state)."""
    scales = dict(x=x_scale, dt=dt_scale, B=B_scale, C=C_scale)
    p, y, h_last, _keep = _ssd_prepare(qx, qdt, A, qB, qC, D, dt_bias, dt_limit, initial_state, return_last_state,
                                       scales, out_state, "cpu")
    lib = load_library()
    rc = lib.mq_ssd_cpu(ctypes.byref(p), int(num_threads))
    if rc != 0:
        _raise(lib, rc, "mq_ssd_cpu")
    return (y, h_last) if (return_last_state or out_state is not None) else y


def ssd_scan_native(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, None),
                    initial_state=None, return_last_state=False, chunk_size=None, *, num_threads=0, out_state=None):
    """`mq_deploy.ops.ssd.ssd_scan_ref` on the C++ CPU library, float32 (mq::SSDScanFloat's kernel);
    chunk_size is accepted for the common signature and unused."""
    if not dt_softplus:
        raise MQUserError("the native SSD scan always applies softplus to dt (mq::SSDScan semantics)")
    p, y, h_last, _keep = _ssd_prepare(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state, return_last_state,
                                       None, out_state, "cpu")
    lib = load_library()
    rc = lib.mq_ssd_cpu(ctypes.byref(p), int(num_threads))
    if rc != 0:
        _raise(lib, rc, "mq_ssd_cpu")
    return (y, h_last) if (return_last_state or out_state is not None) else y


# --- CUDA library (tests/gpu and bench/scan_gpu.py; the product calls it through the TensorRT plugin) ---

CUDA_LIB_NAME = "libmq_scan_cuda.so"
_cuda_lib = None


def cuda_library_path() -> str:
    return os.environ.get("MQ_SCAN_CUDA_LIB") or os.path.join(NATIVE_DIR, CUDA_LIB_NAME)


def load_cuda_library():
    global _cuda_lib
    if _cuda_lib is None:
        where = cuda_library_path()
        if not os.path.exists(where):
            raise MQUserError(f"CUDA selective scan library not found at {where}; build it with: "
                              "python -m mq_deploy.ops.native --build --cuda   (needs nvcc and cmake)")
        lib = _declare(ctypes.CDLL(where))
        P = ctypes.POINTER(MQScanParams)
        for fn in (lib.mq_scan_cuda, lib.mq_scan_step_cuda):
            fn.argtypes = [P, ctypes.c_void_p]
            fn.restype = ctypes.c_int
        lib.mq_scan_cuda_f16in.argtypes = [P] + [ctypes.c_void_p] * 6
        lib.mq_scan_cuda_f16in.restype = ctypes.c_int
        _cuda_lib = lib
    return _cuda_lib


def selective_scan_int8_cuda(qx, x_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None, qz=None,
                             z_scale=None, delta_bias=None, delta_softplus=True, initial_state=None,
                             return_last_state=False, gate_scale=None, *, out_dtype=None,
                             out_state=None, step=False):
    """`selective_scan_int8_ref` on libmq_scan_cuda.so (CUDA tensors, torch's current stream).
    step=True calls the decode-step entry point (seqlen must be 1)."""
    import torch

    p, y, h_last, _keep = _prepare(qx, x_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz, z_scale,
                                   delta_bias, delta_softplus, initial_state, return_last_state, gate_scale,
                                   out_dtype, out_state, "cuda")
    lib = load_cuda_library()
    stream = ctypes.c_void_p(torch.cuda.current_stream(qx.device).cuda_stream)
    fn = lib.mq_scan_step_cuda if step else lib.mq_scan_cuda
    with torch.cuda.device(qx.device):      # the library launches on the thread's current device
        rc = fn(ctypes.byref(p), stream)
    if rc != 0:
        _raise(lib, rc, fn.__name__)
    return (y, h_last) if (return_last_state or out_state is not None) else y


def ssd_scan_int8_cuda(qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, D=None, dt_bias=None,
                       dt_limit=(0.0, None), initial_state=None, return_last_state=False, *, out_state=None,
                       step=False, workspace=None):
    """`mq_deploy.ops.ssd.ssd_scan_int8_ref` on libmq_scan_cuda.so (CUDA tensors, torch's current stream; per-channel
    scales go to the device). step=True: the decode-step kernel (L must be 1); workspace: a CUDA uint8 tensor handed
    to mq_ssd_cuda_ws as the L-split's scratch (what the TensorRT plugin does) instead of a stream allocation."""
    import torch

    scales = dict(x=x_scale, dt=dt_scale, B=B_scale, C=C_scale)
    p, y, h_last, _keep = _ssd_prepare(qx, qdt, A, qB, qC, D, dt_bias, dt_limit, initial_state, return_last_state,
                                       scales, out_state, "cuda")
    lib = load_cuda_library()
    stream = ctypes.c_void_p(torch.cuda.current_stream(qx.device).cuda_stream)
    with torch.cuda.device(qx.device):      # the library launches on the thread's current device
        if step:
            rc, name = lib.mq_ssd_step_cuda(ctypes.byref(p), stream), "mq_ssd_step_cuda"
        elif workspace is not None:
            name = "mq_ssd_cuda_ws"
            rc = lib.mq_ssd_cuda_ws(ctypes.byref(p), workspace.data_ptr(), workspace.numel(), stream)
        else:
            rc, name = lib.mq_ssd_cuda(ctypes.byref(p), stream), "mq_ssd_cuda"
    if rc != 0:
        _raise(lib, rc, name)
    return (y, h_last) if (return_last_state or out_state is not None) else y


def build(cuda: bool = False, out_dir: str = NATIVE_DIR) -> list[str]:
    """Rebuild the native libraries from plugins/selective_scan (source checkouts only)."""
    script = os.path.join(_SOURCE_DIR, "build_native.py")
    if not os.path.exists(script):
        raise MQUserError(f"{script} not found: building needs a source checkout of mq-deploy "
                          "(or set MQ_SCAN_LIB to a prebuilt libmq_scan_cpu.so)")
    import importlib.util
    spec = importlib.util.spec_from_file_location("mq_scan_build_native", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    global _lib, _load_error
    _lib, _load_error = None, None
    return mod.build(out_dir, cuda=cuda)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mq_deploy.ops.native",
                                 description="Build or check the native selective scan library.")
    ap.add_argument("--build", action="store_true", help="build libmq_scan_cpu.so into mq_deploy/_native/")
    ap.add_argument("--cuda", action="store_true", help="with --build: also libmq_scan_cuda.so when nvcc is found")
    a = ap.parse_args(argv)
    if a.build:
        for path in build(cuda=a.cuda):
            print(path)
    if available():
        print(f"{library_path()}: version {load_library().mq_scan_version().decode()}")
        return 0
    print(unavailable_reason(), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
