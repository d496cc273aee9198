"""The Mamba2 scan (SSD, state space duality): the plain step-by-step reference, the chunked form, one
decode step, and the exact semantics of the int8 op. Same signature for the reference and the fast path.

Layout: x [batch, L, H, P] (H heads of P channels), dt [batch, L, H] (before its bias), A, D, dt_bias
[H] (one scalar A per head), B, C [batch, L, G, N] (G groups of N states; head h reads group
h // (H / G)), states [batch, H, P, N] (as mamba-ssm and transformers keep them).

    dt  = clamp(softplus(dt + dt_bias), lo, hi)              (softplus optional; hi None: no upper limit)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t    (per head)
    y_t = h_t . C_t + D * x_t

`ssd_scan_ref` is a per-step loop in the input dtype (float64 works): the definition every other
implementation (the chunked path, the ONNX function body, the C++ kernel) is tested against.

`ssd_scan` is the chunked form: inside a chunk of Q steps the output is a masked quadratic form
y = (L o C B^T) (dt x) with the decay mask L[i, j] = exp(sum_{j<k<=i} dt_k A) (MatMuls), and the state is
carried across chunks by the recurrence (one step per chunk). It is exact in real arithmetic; in floating
point it sums in another order than the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mq_deploy.errors import MQUserError


def _check(x, dt, A, B, C, D, dt_bias, initial_state):
    if x.dim() != 4:
        raise MQUserError(f"x must be [batch, L, heads, head_dim], got {tuple(x.shape)}")
    b, L, H, P = x.shape
    if tuple(dt.shape) != (b, L, H):
        raise MQUserError(f"dt must be [{b}, {L}, {H}], got {tuple(dt.shape)}")
    if tuple(A.shape) != (H,):
        raise MQUserError(f"A must be [{H}] (one value per head), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, L) or C.shape != B.shape:
        raise MQUserError(f"B and C must be [{b}, {L}, groups, d_state], got {tuple(B.shape)}, {tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if H % G:
        raise MQUserError(f"{H} heads are not a multiple of {G} groups")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (H,):
            raise MQUserError(f"{name} must be [{H}], got {tuple(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, H, P, N):
        raise MQUserError(f"initial_state must be [{b}, {H}, {P}, {N}], got {tuple(initial_state.shape)}")


def discretize(dt, dt_bias=None, dt_softplus=True, dt_limit=(0.0, None)):
    """The step size each head uses: clamp(softplus(dt + dt_bias), lo, hi)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if lo is not None and lo > 0:
        dt = dt.clamp_min(lo)
    if hi is not None:
        dt = dt.clamp_max(hi)
    return dt


def _heads(t, H):
    """[b, L, G, N] -> [b, L, H, N]: each head reads its group."""
    G = t.shape[2]
    return t if G == H else t.repeat_interleave(H // G, dim=2)


def _dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ssd_scan_ref(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, None),
                 initial_state=None, return_last_state=False, chunk_size=None):
    """Per-step reference (chunk_size is accepted for the common signature and unused)."""
    _check(x, dt, A, B, C, D, dt_bias, initial_state)
    dtype = _dtype(x)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    b, L, H, P = x.shape
    dt = discretize(dt, None if dt_bias is None else dt_bias.to(dtype), dt_softplus, dt_limit)
    B, C = _heads(B, H), _heads(C, H)
    h = (torch.zeros(b, H, P, B.shape[-1], dtype=dtype, device=x.device) if initial_state is None
         else initial_state.to(dtype).clone())
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]                        # [b, H, 1, 1]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1))                            # [b, H, P]
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D.to(dtype)[:, None]
    return (y, h) if return_last_state else y


def ssd_scan(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, None),
             initial_state=None, return_last_state=False, chunk_size=64):
    """Chunked SSD (quadratic inside chunks of `chunk_size` steps, recurrent across them)."""
    _check(x, dt, A, B, C, D, dt_bias, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise MQUserError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    dtype = _dtype(x)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    b, L, H, P = x.shape
    N = B.shape[3]
    dt = discretize(dt, None if dt_bias is None else dt_bias.to(dtype), dt_softplus, dt_limit)
    Q = max(1, min(chunk_size, L))
    pad = (-L) % Q
    if pad:      # padded steps have dt = 0: no decay, no input, so the carried state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = (L + pad) // Q
    xd = (x * dt[..., None]).view(b, nc, Q, H, P)                                 # dt_j x_j
    a = (dt * A).view(b, nc, Q, H)                                                # log decay of each step
    acs = torch.cumsum(a, dim=2)                                                  # [b, c, Q, H]
    Bh, Ch = _heads(B, H).view(b, nc, Q, H, N), _heads(C, H).view(b, nc, Q, H, N)
    # inside each chunk: y_i = sum_{j<=i} exp(acs_i - acs_j) (C_i . B_j) dt_j x_j
    seg = acs[:, :, :, None, :] - acs[:, :, None, :, :]                           # [b, c, i, j, H]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bcijh", Ch, Bh) * decay
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xd)
    # what each chunk adds to the state, decayed to the chunk's end
    to_end = torch.exp(acs[:, :, -1:, :] - acs)                                   # [b, c, Q, H]
    chunk_states = torch.einsum("bcjh,bcjhn,bcjhp->bchpn", to_end, Bh, xd)
    chunk_decay = torch.exp(acs[:, :, -1, :])                                     # [b, c, H]
    h = (torch.zeros(b, H, P, N, dtype=dtype, device=x.device) if initial_state is None
         else initial_state.to(dtype))
    starts = []
    for c in range(nc):          # the recurrence across chunks: one step per chunk
        starts.append(h)
        h = chunk_decay[:, c, :, None, None] * h + chunk_states[:, c]
    start = torch.stack(starts, dim=1)                                            # [b, c, H, P, N]
    y = y + torch.einsum("bcihn,bchpn->bcihp", Ch, start) * torch.exp(acs)[..., None]
    y = y.reshape(b, nc * Q, H, P)[:, :L]
    if D is not None:
        y = y + x[:, :L] * D.to(dtype)[:, None]
    return (y, h) if return_last_state else y


def ssd_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, None)):
    """One decode step. state [b, H, P, N] (a new tensor is returned); x [b, H, P]; dt [b, H]; B, C [b, G, N].
    Returns (y [b, H, P], new state)."""
    y, h = ssd_scan_ref(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, dt_bias, dt_softplus, dt_limit,
                        initial_state=state, return_last_state=True)
    return y[:, 0], h


def dequantize_channels(q, scale):
    """q * scale over the last axis: scale a scalar, or one value per channel (per head / per group,
    expanded). float32, as ONNX DequantizeLinear computes it."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    return q.to(torch.float32) * s


def ssd_scan_int8_ref(qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, D=None, dt_bias=None,
                      dt_limit=(0.0, None), initial_state=None, return_last_state=False):
    """The exact semantics of the int8 mq::SSDScan op: int8 x [b, L, H, P], dt [b, L, H], B, C [b, L, G, N];
    each scale a scalar or one value per channel of the last axis of its tensor (flattened: H*P for x, H
    for dt, G*N for B and C). Dequantized in float32, then the reference scan in float32."""
    b, L, H, P = qx.shape
    G, N = qB.shape[2], qB.shape[3]
    x = dequantize_channels(qx.reshape(b, L, H * P), x_scale).view(b, L, H, P)
    dt = dequantize_channels(qdt, dt_scale)
    Bf = dequantize_channels(qB.reshape(b, L, G * N), B_scale).view(b, L, G, N)
    Cf = dequantize_channels(qC.reshape(b, L, G * N), C_scale).view(b, L, G, N)
    return ssd_scan_ref(x, dt, A.float(), Bf, Cf, None if D is None else D.float(),
                        None if dt_bias is None else dt_bias.float(), True, dt_limit, initial_state, return_last_state)


__all__ = ["dequantize_channels", "discretize", "ssd_scan", "ssd_scan_int8_ref", "ssd_scan_ref", "ssd_state_update"]
