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

from mq_deploy.families.parallel.folds import composite_hooks

quarot_fold, mambaquant_observers, mambaquant_fold, quant_flags, add_runtime_buffers = \
    composite_hooks("zamba2_out_rotation")
