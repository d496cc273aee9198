"""The MoE block's hooks into the recipes. The shared transforms cover the routed experts (the residual
rotation through the router, up/gate and down; the online Hadamard before the experts' down_proj, which
is the block's out_linear). What is the block's own: the shared expert's down projection gets its own
online Hadamard (of its own width), folded in float64, its matrix a buffer saved with the weights."""

from __future__ import annotations

import torch

from mq_deploy.transforms.fold import rotate_linear_input


def rotate_shared_down(mixer) -> None:
    """shared_down(y) = shared_down'(y H) with shared_down' W H: the quantizer sees y H."""
    from mq_deploy.transforms.rotations import hadamard_rotation

    if mixer.shared_down is None or mixer.shared_rotation is not None:
        return
    H = hadamard_rotation(mixer.shared_down.in_features).double()
    rotate_linear_input(mixer.shared_down, H)
    mixer.register_buffer("shared_rotation", H.to(mixer.shared_down.weight.dtype))


def quarot_fold(mixer) -> None:
    rotate_shared_down(mixer)


def mambaquant_observers(point: str) -> list:
    return []


def mambaquant_fold(mixer, prefix: str, obs: dict, cfg) -> None:
    rotate_shared_down(mixer)


def quant_flags(mixer) -> dict:
    return {"moe_shared_rotation": True} if mixer.shared_rotation is not None else {}


def add_runtime_buffers(mixer, quant: dict) -> None:
    """The shared expert's rotation is in the weights file (shape only here)."""
    if quant.get("moe_shared_rotation") and mixer.shared_down is not None:
        n = mixer.shared_down.in_features
        mixer.register_buffer("shared_rotation", torch.zeros(n, n))
