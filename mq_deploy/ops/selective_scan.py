"""Selective scan (Mamba1 SSM recurrence): the plain reference and the fast CPU path, same signature.

Layout is channels-last, the layout the mixer produces: x, delta, z are [batch, L, Di]; B, C are
[batch, L, N]; A is [Di, N]; D and delta_bias are [Di]; states are [batch, Di, N] as in mamba-ssm.

    dt  = softplus(delta + delta_bias)                       (softplus optional)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t         (per channel d, per state n)
    y_t = C_t . h_t + D * x_t ;  y = y * silu(z)

`selective_scan_ref` is a per-step loop that computes in the input dtype (float64 works); it is the
definition the fast path and every later implementation (ONNX function body, C++ and CUDA kernels)
are tested against.

`selective_scan` is the fast path. It runs the recurrence as a time-step loop over [L, batch, N, Di]
tensors (time-major, channels innermost, so every step touches two contiguous blocks) with
exp2 for the decay; measured on this CPU this beats parallel/chunked scans by a wide margin because
the scan is memory-bound. Under autograd it is one custom Function with a hand-written backward
(one reverse loop plus vectorised reductions). Without autograd it processes the sequence in time
chunks of about 1 MiB per temporary, so decay, drive, recurrence and readout of a chunk all run out of
L2 cache: measured on this 2-core CPU, 1 MiB chunks are 2-2.7x faster than 16 MiB ones (130m layer
1x256: 19.2 -> 7.2 ms; byte-LM sample 8x1024: 155 -> 73 ms), and they also stay clear of glibc's
32 MB mmap threshold, whose page faults on every re-allocation cost more than the scan itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mq_deploy.errors import MQUserError

_LOG2E = 1.0 / math.log(2.0)
_CHUNK_BYTES = 2**20   # per [T, b, N, Di] temporary: stays in a core's L2 (1 MiB here)


def _check_shapes(x, delta, A, B, C, D, z, delta_bias, initial_state):
    if x.dim() != 3:
        raise MQUserError(f"x must be [batch, L, Di], got {tuple(x.shape)}")
    bsz, seqlen, dim = x.shape
    if delta.shape != x.shape:
        raise MQUserError(f"delta {tuple(delta.shape)} must match x {tuple(x.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise MQUserError(f"A must be [Di={dim}, N], got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (bsz, seqlen, n):
            raise MQUserError(f"{name} must be [{bsz}, {seqlen}, {n}], got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise MQUserError(f"{name} must be [{dim}], got {tuple(t.shape)}")
    if z is not None and z.shape != x.shape:
        raise MQUserError(f"z {tuple(z.shape)} must match x {tuple(x.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (bsz, dim, n):
        raise MQUserError(f"initial_state must be [{bsz}, {dim}, {n}], got {tuple(initial_state.shape)}")


def _discretize(delta, delta_bias, delta_softplus):
    dt = delta if delta_bias is None else delta + delta_bias
    return F.softplus(dt) if delta_softplus else dt


def _finish(y, x, D, z):
    if D is not None:
        y = y + x * D
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_ref(x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                       initial_state=None, return_last_state=False):
    """Plain per-step reference. Computes in float32, or float64 when x is float64."""
    _check_shapes(x, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, delta, A, B, C = (t.to(dtype) for t in (x, delta, A, B, C))
    D = None if D is None else D.to(dtype)
    z = None if z is None else z.to(dtype)
    delta_bias = None if delta_bias is None else delta_bias.to(dtype)
    dt = _discretize(delta, delta_bias, delta_softplus)
    bsz, seqlen, dim = x.shape
    h = (torch.zeros(bsz, dim, A.shape[1], dtype=dtype, device=x.device) if initial_state is None
         else initial_state.to(dtype).clone())
    ys = []
    for t in range(seqlen):
        dA = torch.exp(dt[:, t, :, None] * A)                      # [b, Di, N]
        dBx = dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        h = dA * h + dBx
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = _finish(torch.stack(ys, dim=1), x, D, z)
    return (y, h) if return_last_state else y


# --- fast path -----------------------------------------------------------------------------------
# Internal tensors are time-major and channels-last: dt, x [L, b, Di]; B, C [L, b, N];
# states [b, N, Di]; A2 = A^T * log2(e) [N, Di] so that exp(dt*A) = exp2(dt*A2).

def _decay(dt, A2):
    return torch.exp2(dt.unsqueeze(-2) * A2)                       # [T, b, N, Di]


def _drive(dt, x, B):
    return (dt * x).unsqueeze(-2) * B.unsqueeze(-1)                # [T, b, N, Di]


def _recur_(a, H, h0):
    """In place: H[t] <- a[t] * H[t-1] + H[t], with H[-1] = h0. H holds the drive on entry."""
    prev = h0
    for t in range(H.shape[0]):
        H[t].addcmul_(a[t], prev)
        prev = H[t]


def _readout(C, H):
    return torch.matmul(C.unsqueeze(-2), H).squeeze(-2)            # [T, b, Di]


class _ScanFn(torch.autograd.Function):
    """Core recurrence with a hand-written backward: (dt, x, A2, B, C, h0) -> (y, h_last)."""

    @staticmethod
    def forward(ctx, dt, x, A2, B, C, h0):
        a = _decay(dt, A2)
        H = _drive(dt, x, B)
        _recur_(a, H, h0)
        y = _readout(C, H)
        ctx.save_for_backward(dt, x, A2, B, C, h0, H, a)
        return y, H[-1].clone()

    @staticmethod
    def backward(ctx, gy, g_last):
        dt, x, A2, B, C, h0, H, a = ctx.saved_tensors
        # G[t] = dL/dH[t]: readout term plus what flows back through H[t+1] = a[t+1] * H[t] + ...
        G = C.unsqueeze(-1) * gy.unsqueeze(-2)
        if g_last is not None:
            G[-1] += g_last
        for t in range(G.shape[0] - 2, -1, -1):
            G[t].addcmul_(a[t + 1], G[t + 1])
        dC = torch.matmul(H, gy.unsqueeze(-1)).squeeze(-1)        # sum over Di
        dh0 = G[0] * a[0]
        # decay: a = exp2(dt * A2), so d a / d(dt * A2) = a * ln2; it multiplies H[t-1] * G[t]
        gu = torch.empty_like(G)
        torch.mul(G[0], h0, out=gu[0])
        torch.mul(G[1:], H[:-1], out=gu[1:])
        gu.mul_(a).mul_(math.log(2.0))
        d_dt = (gu * A2).sum(-2)
        dA2 = (gu * dt.unsqueeze(-2)).sum((0, 1))
        # drive: dt * x * B
        s = torch.matmul(B.unsqueeze(-2), G).squeeze(-2)          # sum over N -> [L, b, Di]
        d_dt = d_dt + s * x
        dx = s * dt
        dB = torch.matmul(G, (dt * x).unsqueeze(-1)).squeeze(-1)  # sum over Di -> [L, b, N]
        return d_dt, dx, dA2, dB, dC, dh0


def _scan_nograd(dt, x, A2, B, C, h0):
    seqlen, bsz, dim = x.shape
    n = A2.shape[0]
    step = max(1, _CHUNK_BYTES // max(1, bsz * n * dim * x.element_size()))
    h = h0
    ys = []
    for s in range(0, seqlen, step):
        e = min(seqlen, s + step)
        a = _decay(dt[s:e], A2)
        H = _drive(dt[s:e], x[s:e], B[s:e])
        _recur_(a, H, h)
        ys.append(_readout(C[s:e], H))
        h = H[-1].clone()
    return torch.cat(ys, 0), h


def selective_scan(x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, return_last_state=False):
    """Fast CPU selective scan; same signature and semantics as `selective_scan_ref`."""
    _check_shapes(x, delta, A, B, C, D, z, delta_bias, initial_state)
    bsz, seqlen, dim = x.shape
    n = A.shape[1]
    dt = _discretize(delta, delta_bias, delta_softplus)
    A2 = A.t().to(x.dtype) * _LOG2E
    h0 = (x.new_zeros(bsz, n, dim) if initial_state is None
          else initial_state.to(x.dtype).transpose(1, 2).contiguous())
    tm = [t.transpose(0, 1).contiguous() for t in (dt, x, B.to(x.dtype), C.to(x.dtype))]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, delta, A, B, C, delta_bias, initial_state))
    if needs_grad:
        y, h = _ScanFn.apply(tm[0], tm[1], A2, tm[2], tm[3], h0)
    else:
        y, h = _scan_nograd(tm[0], tm[1], A2, tm[2], tm[3], h0)
    y = _finish(y.transpose(0, 1), x, D, z)
    return (y, h.transpose(1, 2)) if return_last_state else y


def selective_state_update(state, x, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=True):
    """One decode step. state [b, Di, N] (updated copy returned); x, delta, z [b, Di]; B, C [b, N].

    Returns (y [b, Di], new_state). Equals one step of `selective_scan_ref` with initial_state=state.
    """
    dt = _discretize(delta, delta_bias, delta_softplus)
    dA = torch.exp(dt.unsqueeze(-1) * A)
    new_state = dA * state + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    y = torch.matmul(new_state, C.unsqueeze(-1)).squeeze(-1)
    return _finish(y, x, D, z), new_state


def selective_scan_int8_ref(qx, x_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None, qz=None,
                            z_scale=None, delta_bias=None, delta_softplus=True, initial_state=None,
                            return_last_state=False, gate_scale=None):
    """The int8 scan's semantics (what mq::SelectiveScan and the native kernels compute).

    Inputs x, delta, B, C, z are int8 with per-tensor float32 scales (symmetric, zero point 0); A, D,
    delta_bias, gate_scale and the state are float32. Each int8 input is dequantized (q * scale) and the
    recurrence runs exactly as `selective_scan_ref` in float32. The gate is silu(z), or
    z * sigmoid(gate_scale * z) when a Smooth-Fused factor was folded into it.
    """
    for name, q in (("x", qx), ("delta", qdelta), ("B", qB), ("C", qC), ("z", qz)):
        if q is not None and q.dtype != torch.int8:
            raise MQUserError(f"{name} must be int8, got {q.dtype}")
    if (qz is None) != (z_scale is None):
        raise MQUserError("z and z_scale go together")

    def deq(q, s):
        return q.to(torch.float32) * torch.as_tensor(s, dtype=torch.float32)

    x, delta, B, C = deq(qx, x_scale), deq(qdelta, delta_scale), deq(qB, B_scale), deq(qC, C_scale)
    z = None if qz is None else deq(qz, z_scale)
    out = selective_scan_ref(x, delta, A.float(), B, C, None if D is None else D.float(),
                             z if gate_scale is None else None,
                             None if delta_bias is None else delta_bias.float(), delta_softplus,
                             None if initial_state is None else initial_state.float(), return_last_state)
    if gate_scale is None or z is None:
        return out
    y, h = out if return_last_state else (out, None)
    y = y * (z * torch.sigmoid(gate_scale.float() * z))
    return (y, h) if return_last_state else y
