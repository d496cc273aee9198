"""The parallel block's hooks into the recipes (see families/mamba1/folds.py for the hook contract).

The shared transforms see the block through readers() (q/k/v and in_proj: the norm fusion, SmoothQuant
at the block input and the residual rotation fold into all four) and writers() (o_proj and out_proj).
What the shared code cannot do for it, done here:
- the online Hadamard before each output projection: the block has two (o_proj, the attention heads'
  output; out_proj, the gated norm's output), so its `out_linear` is None and the recipes' shared step
  skips it; quarot_fold / mambaquant_fold set one rotation per child instead (same construction: the
  normalised Hadamard matrix of that projection's input width, folded into its columns in float64);
- MambaQuant's Smooth-Fused fold of the Mamba2 child (out_proj's factor into its gated norm's weight),
  which must come before that child's rotation.
A quantized checkpoint records the rotations as the flag `parallel_out_rotation`; the loader declares the
buffers and ParallelMixer fills them with the Hadamard matrices when the model is materialised.
"""

from __future__ import annotations

import torch

from mq_deploy.families.mamba2 import folds as mamba2


def composite_hooks(flag: str) -> tuple:
    """The recipe hooks of a block made of child mixers with one output projection each (this family; zamba2):
    (quarot_fold, mambaquant_observers, mambaquant_fold, quant_flags, add_runtime_buffers); `flag` is the
    quantized checkpoint's record that the children's online rotations exist. The block has a `mamba` child
    (Mamba2) and children_mixers(); its _apply fills the rotations once `_hadamard_pending` is set."""

    def rotate_children(mixer) -> None:
        from mq_deploy.families.parallel.mixer import shared_hadamard
        from mq_deploy.transforms import fold

        for child in mixer.children_mixers():
            n, dtype = child.out_linear.in_features, child.out_linear.weight.dtype
            fold.set_online_out_rotation(child, shared_hadamard(n, torch.float64),
                                         runtime=shared_hadamard(n, dtype))

    def quarot_fold(mixer) -> None:
        """The online Hadamard before each child's output projection."""
        rotate_children(mixer)

    def mambaquant_observers(point: str) -> list:
        return mamba2.mambaquant_observers(point)

    def mambaquant_fold(mixer, prefix: str, obs: dict, cfg) -> None:
        """The Mamba2 child's Smooth-Fused fold (its points carry the block's prefix), then the rotations."""
        mamba2.mambaquant_fold(mixer.mamba, prefix, obs, cfg)
        rotate_children(mixer)

    def quant_flags(mixer) -> dict:
        return {flag: all(c.out_rotation is not None for c in mixer.children_mixers())}

    def add_runtime_buffers(mixer, quant: dict) -> None:
        """Shapes only (the loader builds the model on the meta device); the mixer's _apply fills them."""
        mamba2.add_runtime_buffers(mixer.mamba, quant)
        if quant.get(flag):
            for child in mixer.children_mixers():
                n = child.out_linear.in_features
                child.register_buffer("out_rotation", torch.empty(n, n), persistent=False)
            mixer._hadamard_pending = True

    return quarot_fold, mambaquant_observers, mambaquant_fold, quant_flags, add_runtime_buffers


quarot_fold, mambaquant_observers, mambaquant_fold, quant_flags, add_runtime_buffers = \
    composite_hooks("parallel_out_rotation")
