"""Output-preserving folds, one small function per site, computed in float64.

Conventions: nn.Linear computes y = x W^T + b. Rotating the residual stream by an orthogonal Q means
every tensor that lives on the stream is multiplied on the right by Q (h -> h Q). RMSNorm without a
weight commutes with that (rms(h Q) = rms(h)), so norm weights are fused into the linears that read
the normalised stream first.

Writers of the stream: embedding / patch embedding (+ class token, position embedding), out_proj.
Readers: in_proj (through the block norm), lm_head / head (through norm_f).
"""

from __future__ import annotations

import torch

from mq_deploy.errors import MQUserError
from mq_deploy.models.mamba import MambaLM, MambaMixer


def _f64(t):
    return t.detach().to(torch.float64)


def _assign(param, value):
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


_ROW_BLOCK_BYTES = 64 << 20    # float64 rows per block of _update_rows: the temporaries of a 50k-row head stay small


def _update_rows(param, fn) -> None:
    """param <- fn(float64 param), a block of rows at a time: fn must act on each row alone (W @ Q, W * w).
    A vocabulary-sized embedding or head is never held in float64 whole (2.8b: 1 GiB per copy)."""
    rows = max(1, _ROW_BLOCK_BYTES // max(1, 8 * param[0].numel()))
    with torch.no_grad():
        for i in range(0, param.shape[0], rows):
            blk = param[i:i + rows]
            blk.copy_(fn(_f64(blk)).to(param.dtype))


def fuse_norm_into_linear(norm, linears) -> None:
    """norm(x) W^T = (x / rms(x)) (W diag(w))^T: move the norm weight into every reader, set it to 1."""
    w = _f64(norm.weight)
    for lin in linears:
        _update_rows(lin.weight, lambda r: r * w)
    _assign(norm.weight, torch.ones_like(w))


def smooth_norm_into_linear(norm, lin, s) -> None:
    """SmoothQuant at a norm -> linear site: the norm's output channels / s, the linear's columns * s."""
    s = _f64(s)
    _assign(norm.weight, _f64(norm.weight) / s)
    _update_rows(lin.weight, lambda r: r * s)


def untie_lm_head(model: MambaLM) -> None:
    """Give lm_head its own weight so the head and the embedding can be transformed differently."""
    if model.lm_head.weight is model.embedding.weight:
        model.lm_head.weight = torch.nn.Parameter(model.embedding.weight.detach().clone())
    model.cfg.tie_embeddings = False


def fuse_norms(model) -> None:
    """Fuse every RMSNorm weight into the linear that reads it (block norm -> in_proj, norm_f -> head)."""
    for layer in model.layers:
        fuse_norm_into_linear(layer.norm, [layer.mixer.in_proj])
    if isinstance(model, MambaLM):
        untie_lm_head(model)
        fuse_norm_into_linear(model.norm_f, [model.lm_head])
    else:
        fuse_norm_into_linear(model.norm_f, [model.head])


def rotate_linear_input(lin, Q) -> None:
    """The input of `lin` becomes x Q: y = (x Q) (W Q)^T."""
    _update_rows(lin.weight, lambda r: r @ Q)


def rotate_linear_output(lin, Q) -> None:
    """The output of `lin` becomes y Q: W <- Q^T W, b <- b Q."""
    _assign(lin.weight, Q.t() @ _f64(lin.weight))
    if lin.bias is not None:
        _assign(lin.bias, _f64(lin.bias) @ Q)


def rotate_embeddings(model, Q) -> None:
    """Writers at the bottom of the stream: token embedding, or patch embedding + class token + positions."""
    if isinstance(model, MambaLM):
        _update_rows(model.embedding.weight, lambda r: r @ Q)
        return
    conv = model.patch_embed.proj
    _assign(conv.weight, torch.einsum("i...,ij->j...", _f64(conv.weight), Q))
    if conv.bias is not None:
        _assign(conv.bias, _f64(conv.bias) @ Q)
    _assign(model.cls_token, _f64(model.cls_token) @ Q)
    _assign(model.pos_embed, _f64(model.pos_embed) @ Q)


def _check_norms_fused(model) -> None:
    norms = [layer.norm for layer in model.layers] + [model.norm_f]
    if any(not torch.all(n.weight == 1) for n in norms):
        raise MQUserError("rotate_residual needs fused norms (call fuse_norms first): "
                         "a weighted RMSNorm does not commute with a rotation")


def rotate_residual(model, Q) -> None:
    """Rotate the residual stream by orthogonal Q [d_model, d_model] (offline, fully folded)."""
    Q = _f64(Q)
    _check_norms_fused(model)
    rotate_embeddings(model, Q)
    for layer in model.layers:
        rotate_linear_input(layer.mixer.in_proj, Q)
        rotate_linear_output(layer.mixer.out_proj, Q)
    rotate_linear_input(model.lm_head if isinstance(model, MambaLM) else model.head, Q)


def set_online_out_rotation(mixer: MambaMixer, H, runtime: torch.Tensor | None = None) -> None:
    """Online rotation before out_proj: the mixer computes out_proj(y H) with out_proj W <- W H.

    H stays a runtime op (a buffer applied to the activation) so the quantizer sees y H, whose channel
    distribution is flatter than y's; the product is unchanged in exact arithmetic. runtime: the buffer to
    use (H in the weight dtype), so that every layer shares one; H is not saved with the weights (a
    quantized checkpoint records that it is the Hadamard matrix and the loader rebuilds it): d_inner^2 per
    layer would be 6.7 GB of one matrix at the 2.8b shape.
    """
    H = _f64(H)
    rotate_linear_input(mixer.out_proj, H)
    buf = runtime if runtime is not None else H.to(mixer.out_proj.weight.dtype)
    mixer.register_buffer("out_rotation", buf, persistent=False)


def rotate_dt_lowrank(mixer: MambaMixer, R, branch: str = "") -> None:
    """Rotate the low-rank dt between x_proj and dt_proj (a purely linear link): dt_low -> dt_low R.

    x_proj's first dt_rank output rows become R^T W, dt_proj's input columns W R.
    """
    R = _f64(R)
    r = mixer.cfg.dt_rank
    x_proj, dt_proj = getattr(mixer, "x_proj" + branch), getattr(mixer, "dt_proj" + branch)
    w = _f64(x_proj.weight)
    w[:r] = R.t() @ w[:r]
    _assign(x_proj.weight, w)
    rotate_linear_input(dt_proj, R)


def smooth_out_proj_into_gate(mixer: MambaMixer, s) -> None:
    """Smooth out_proj's input y by 1/s per channel (W_out <- W_out diag(s)), folded into the gate.

    y = scan(...) * silu(z). Dividing z's rows of in_proj by s gives z' = z / s, and the gate
    z' * sigmoid(s z') = silu(z) / s, so the mixer computes y / s with no extra runtime op.
    """
    s = _f64(s)
    di = mixer.cfg.d_inner
    w = _f64(mixer.in_proj.weight)
    w[di:] /= s[:, None]
    _assign(mixer.in_proj.weight, w)
    if mixer.in_proj.bias is not None:
        b = _f64(mixer.in_proj.bias)
        b[di:] /= s
        _assign(mixer.in_proj.bias, b)
    w_out = _f64(mixer.out_proj.weight)
    if mixer.out_rotation is not None:
        raise MQUserError("smooth before setting the online out_proj rotation (smooth, then rotate)")
    _assign(mixer.out_proj.weight, w_out * s)
    prev = mixer.gate_scale
    mixer.register_buffer("gate_scale", (s if prev is None else _f64(prev) * s).to(mixer.out_proj.weight.dtype))


def smooth_scan_bc(mixer: MambaMixer, s, branch: str = "") -> None:
    """Scale the scan's state matmuls per state n: B <- B / s, C <- C * s (rows of x_proj).

    The state becomes h_n / s_n and the readout C_n s_n h_n / s_n is unchanged.
    """
    s = _f64(s)
    cfg = mixer.cfg
    x_proj = getattr(mixer, "x_proj" + branch)
    w = _f64(x_proj.weight)
    r, n = cfg.dt_rank, cfg.d_state
    w[r:r + n] /= s[:, None]
    w[r + n:r + 2 * n] *= s[:, None]
    _assign(x_proj.weight, w)


__all__ = [
    "fuse_norm_into_linear", "smooth_norm_into_linear", "untie_lm_head", "fuse_norms", "rotate_linear_input",
    "rotate_linear_output", "rotate_embeddings", "rotate_residual", "rotate_dt_lowrank", "set_online_out_rotation",
    "smooth_out_proj_into_gate", "smooth_scan_bc",
]
