"""Zamba2's hooks into the recipes (see families/mamba1/folds.py for the hook contract).

The shared transforms see a layer through its Block: the block norm is the Mamba2 input norm, fused, smoothed
and rotated with its reader in_proj; writers() are the per-depth `linear` (T joins the stream) and out_proj;
stream_readers() are q/k/v, whose input [h, e] is two stream tensors side by side (the residual rotation acts
on each half). The shared block's own norms are weightless (the loader folded their weights), and its
internal activations (o_proj's output, the MLP) are not on the stream, so nothing else rotates.
What the shared code cannot do for a layer, done here:
- the online Hadamard before each output projection (o_proj, down_proj, out_proj): `out_linear` is None and
  each child gets its own (the normalised Hadamard matrix of that projection's input width, in float64);
- MambaQuant's Smooth-Fused fold of the Mamba2 child (out_proj's factor into its gated norm's weight), before
  that child's rotation.
A quantized checkpoint records the rotations as the flag `zamba2_out_rotation`; the loader declares the buffers
and Zamba2Mixer fills them with the Hadamard matrices when the model is materialised.
"""

from __future__ import annotations

import torch

from mq_deploy.families.mamba2 import folds as mamba2


def _rotate_children(mixer) -> None:
    from mq_deploy.families.parallel.mixer import shared_hadamard
    from mq_deploy.transforms import fold

    for child in mixer.children_mixers():
        n, dtype = child.out_linear.in_features, child.out_linear.weight.dtype
        fold.set_online_out_rotation(child, shared_hadamard(n, torch.float64), runtime=shared_hadamard(n, dtype))


def quarot_fold(mixer) -> None:
    """The online Hadamard before o_proj, down_proj and out_proj."""
    _rotate_children(mixer)


def mambaquant_observers(point: str) -> list:
    return mamba2.mambaquant_observers(point)


def mambaquant_fold(mixer, prefix: str, obs: dict, cfg) -> None:
    """The Mamba2 child's Smooth-Fused fold (its points carry the layer's prefix), then the rotations."""
    mamba2.mambaquant_fold(mixer.mamba, prefix, obs, cfg)
    _rotate_children(mixer)


def quant_flags(mixer) -> dict:
    return {"zamba2_out_rotation": all(c.out_rotation is not None for c in mixer.children_mixers())}


def add_runtime_buffers(mixer, quant: dict) -> None:
    """Shapes only (the loader builds the model on the meta device); Zamba2Mixer._apply fills them."""
    mamba2.add_runtime_buffers(mixer.mamba, quant)
    if quant.get("zamba2_out_rotation"):
        for child in mixer.children_mixers():
            n = child.out_linear.in_features
            child.register_buffer("out_rotation", torch.empty(n, n), persistent=False)
        mixer._hadamard_pending = True
