"""GPTQ weight rounding (Frantar et al., 2023) on the per-output-channel grid that export writes.

Applied after the recipe's rotations, as QuaRot and Quamba2 do. The grid is exactly RTN's: symmetric
per output channel, scale = max|w| / (2^(b-1) - 1), integers in [-(2^(b-1) - 1), 2^(b-1) - 1]; GPTQ only
chooses *which* integer each weight gets, column by column, pushing each column's rounding error onto
the columns not yet rounded through the inverse Hessian of the layer input, H = E[x x^T] (the
calibration second moment of the quant point that feeds the linear). So the int4/int8 export is
unchanged: `round(w / scale)` of a GPTQ weight is its integer exactly.

Which linear reads which quant point: in_proj <- in_proj, x_proj <- x, dt_proj <- dt_low, out_proj <-
out_proj (after the online rotation), with the Vim's backward branch x_proj_b <- x_b, dt_proj_b <-
dt_low_b. The depthwise conv1d (4 taps per channel) keeps RTN. The Hessians come from the float
model's activations (one calibration pass), not from a sequentially quantized one.

`gptq_quantize` is the fast path (blocked, lazy batch updates); `gptq_quantize_ref` is the textbook
column loop with the same signature, kept beside it for the parity test.
"""

from __future__ import annotations

import torch

from mq_deploy.ops.quant import qmax, weight_scales


def _prepare(w, H, scale, damp):
    W = w.detach().to(torch.float64).clone()
    H = H.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    # upper Cholesky factor of H^-1: row i holds the update of columns i.. after rounding column i
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return W, Hinv, scale.detach().to(torch.float64).reshape(-1)


def _round(col, s, q):
    return torch.clamp(torch.round(col / s), -q, q) * s


def gptq_quantize_ref(w: torch.Tensor, H: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                      damp: float = 0.01) -> torch.Tensor:
    """Textbook GPTQ: one column at a time, updating every later column (float64). Returns w on the grid."""
    scale = weight_scales(w, bits) if scale is None else scale
    W, Hinv, s = _prepare(w, H, scale, damp)
    q = qmax(bits)
    for i in range(W.shape[1]):
        qc = _round(W[:, i], s, q)
        err = (W[:, i] - qc) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        W[:, i] = qc
    return W.to(w.dtype)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                  damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """GPTQ with lazy batch updates (columns in blocks, the updates of later blocks deferred): the
    reference's math with float64 sums in another order."""
    scale = weight_scales(w, bits) if scale is None else scale
    W, Hinv, s = _prepare(w, H, scale, damp)
    q = qmax(bits)
    n = W.shape[1]
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        Wb, Err = W[:, b0:b1].clone(), torch.zeros_like(W[:, b0:b1])
        Hb = Hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            qc = _round(Wb[:, j], s, q)
            err = (Wb[:, j] - qc) / Hb[j, j]
            Wb[:, j:] -= err[:, None] * Hb[j, j:][None, :]
            Wb[:, j] = qc
            Err[:, j] = err
        W[:, b0:b1] = Wb
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    return W.to(w.dtype)


@torch.no_grad()
def gptq_weights(model, hessians: dict, bits: int) -> dict:
    """Round every quantized weight of `model` in place (GPTQ where a Hessian exists, RTN otherwise);
    return {param name: per-channel scale}, the same dict `fakequant.quantize_weights` returns."""
    from mq_deploy.calib.collect import mixers
    from mq_deploy.ops.quant import fake_quantize

    scales = {}
    for prefix, mixer in mixers(model):
        inputs = mixer.family.gptq_inputs           # linear site -> the quant point that is its input
        for site, mod in mixer.weight_modules():
            s = weight_scales(mod.weight, bits)
            H = hessians.get(prefix + inputs[site]) if site in inputs else None
            if H is None:
                new = fake_quantize(mod.weight, s, bits, axis=0)
            else:
                new = gptq_quantize(mod.weight, H, bits, s)
            mod.weight.copy_(new)
            scales[f"{prefix}{site}.weight"] = s
    return scales


__all__ = ["gptq_quantize", "gptq_quantize_ref", "gptq_weights"]
