"""Output-preserving folds, one small function per site, computed in float64.

Conventions: nn.Linear computes y = x W^T + b. Rotating the residual stream by an orthogonal Q means
every tensor that lives on the stream is multiplied on the right by Q (h -> h Q). RMSNorm without a
weight commutes with that (rms(h Q) = rms(h)), so norm weights are fused into the linears that read
the normalised stream first.

Writers of the stream: embedding / patch embedding (+ class token, position embedding), each mixer's
writers() (out_proj). Readers: each mixer's readers() (in_proj, through the block norm), lm_head / head
(through norm_f). Folds that depend on a family's parameters live in families/<name>/folds.py.
"""

from __future__ import annotations

import torch

from mq_deploy.calib.collect import resident_layers
from mq_deploy.errors import MQUserError
from mq_deploy.models.mamba import MambaLM


def f64(t):
    return t.detach().to(torch.float64)


def assign(param, value):
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


_ROW_BLOCK_BYTES = 64 << 20    # float64 rows per block of _update_rows: the temporaries of a 50k-row head stay small


def row_block(width: int) -> int:
    """Rows of `width` values per float64 block of _update_rows."""
    return max(1, _ROW_BLOCK_BYTES // max(1, 8 * width))


def _update_rows(param, fn) -> None:
    """param <- fn(float64 param), a block of rows at a time: fn must act on each row alone (W @ Q, W * w).
    A vocabulary-sized embedding or head is never held in float64 whole (2.8b: 1 GiB per copy)."""
    rows = row_block(param[0].numel())
    with torch.no_grad():
        for i in range(0, param.shape[0], rows):
            blk = param[i:i + rows]
            blk.copy_(fn(f64(blk)).to(param.dtype))


def fuse_norm_into_linear(norm, linears) -> None:
    """norm(x) W^T = (x / rms(x)) (W diag(w))^T: move the norm weight into every reader, set it to 1."""
    w = f64(norm.weight)
    for lin in linears:
        _update_rows(lin.weight, lambda r: r * w)
    assign(norm.weight, torch.ones_like(w))


def smooth_norm_into_linear(norm, linears, s) -> None:
    """SmoothQuant at a norm -> linear(s) site: the norm's output channels / s, every reader's columns * s."""
    s = f64(s)
    assign(norm.weight, f64(norm.weight) / s)
    for lin in linears if isinstance(linears, (list, tuple)) else [linears]:
        _update_rows(lin.weight, lambda r: r * s)


def untie_lm_head(model: MambaLM) -> None:
    """Give lm_head its own weight so the head and the embedding can be transformed differently."""
    if model.lm_head.weight is model.embedding.weight:
        model.lm_head.weight = torch.nn.Parameter(model.embedding.weight.detach().clone())
    model.cfg.tie_embeddings = False


def fuse_norms(model) -> None:
    """Fuse every RMSNorm weight into the linear that reads it (block norm -> in_proj, norm_f -> head)."""
    fuse_layer_norms(model)
    fuse_end_norm(model)


def fuse_layer_norms(model) -> None:
    """The block norms of the layers in memory (all, or a layer-streamed model's window: resident_layers)."""
    for _, layer in resident_layers(model):
        fuse_norm_into_linear(layer.norm, layer.mixer.readers())


def fuse_end_norm(model) -> None:
    """norm_f into the head (an LM's head untied from its embedding first)."""
    if isinstance(model, MambaLM):
        untie_lm_head(model)
        fuse_norm_into_linear(model.norm_f, [model.lm_head])
    else:
        fuse_norm_into_linear(model.norm_f, [model.head])


def rotate_linear_input(lin, Q) -> None:
    """The input of `lin` becomes x Q: y = (x Q) (W Q)^T. (A Hadamard Q as two small products: ops.hadamard.rotate.)"""
    from mq_deploy.ops.hadamard import rotate

    _update_rows(lin.weight, lambda r: rotate(r, Q))


def rotate_linear_output(lin, Q) -> None:
    """The output of `lin` becomes y Q: W <- Q^T W, b <- b Q."""
    assign(lin.weight, Q.t() @ f64(lin.weight))
    if lin.bias is not None:
        assign(lin.bias, f64(lin.bias) @ Q)


def rotate_embeddings(model, Q) -> None:
    """Writers at the bottom of the stream: token embedding, or patch embedding + class token + positions."""
    if isinstance(model, MambaLM):
        _update_rows(model.embedding.weight, lambda r: r @ Q)
        return
    conv = model.patch_embed.proj
    assign(conv.weight, torch.einsum("i...,ij->j...", f64(conv.weight), Q))
    if conv.bias is not None:
        assign(conv.bias, f64(conv.bias) @ Q)
    assign(model.cls_token, f64(model.cls_token) @ Q)
    assign(model.pos_embed, f64(model.pos_embed) @ Q)


def _check_norms_fused(norms) -> None:
    if any(not torch.all(n.weight == 1) for n in norms):
        raise MQUserError("rotate_residual needs fused norms (call fuse_norms first): "
                         "a weighted RMSNorm does not commute with a rotation")


def rotate_residual(model, Q) -> None:
    """Rotate the residual stream by orthogonal Q [d_model, d_model] (offline, fully folded)."""
    rotate_ends(model, Q)
    rotate_layers(model, Q)


def rotate_ends(model, Q) -> None:
    """The stream's ends: its writers at the bottom (embeddings) and the head that reads it at the top."""
    Q = f64(Q)
    _check_norms_fused([model.norm_f])
    rotate_embeddings(model, Q)
    rotate_linear_input(model.lm_head if isinstance(model, MambaLM) else model.head, Q)


def rotate_layers(model, Q) -> None:
    """Each layer in memory (all, or a layer-streamed model's window): its readers and writers of the stream."""
    Q = f64(Q)
    layers = [layer for _, layer in resident_layers(model)]
    _check_norms_fused([layer.norm for layer in layers])
    for layer in layers:
        for lin in layer.mixer.readers():
            rotate_linear_input(lin, Q)
        for lin in layer.mixer.writers():
            rotate_linear_output(lin, Q)
        for lin in getattr(layer.mixer, "stream_readers", list)():    # input: stream tensors side by side
            _update_rows(lin.weight, lambda r: (r.unflatten(-1, (-1, Q.shape[0])) @ Q).flatten(-2))


def set_online_out_rotation(mixer, H, runtime: torch.Tensor | None = None) -> None:
    """Online rotation before out_proj: the mixer computes out_proj(y H) with out_proj W <- W H.

    H stays a runtime op (a buffer applied to the activation) so the quantizer sees y H, whose channel
    distribution is flatter than y's; the product is unchanged in exact arithmetic. runtime: the buffer to
    use (H in the weight dtype), so that every layer shares one; H is not saved with the weights (a
    quantized checkpoint records that it is the Hadamard matrix and the loader rebuilds it): d_inner^2 per
    layer would be 6.7 GB of one matrix at the 2.8b shape.
    """
    H = f64(H)
    rotate_linear_input(mixer.out_linear, H)
    buf = runtime if runtime is not None else H.to(mixer.out_linear.weight.dtype)
    mixer.register_buffer("out_rotation", buf, persistent=False)


__all__ = [
    "fuse_norm_into_linear", "smooth_norm_into_linear", "untie_lm_head", "fuse_norms", "fuse_layer_norms",
    "fuse_end_norm", "rotate_linear_input", "rotate_linear_output", "rotate_embeddings", "rotate_residual",
    "rotate_ends", "rotate_layers", "set_online_out_rotation",
]
