"""Calibration: run a forward loop with observers attached at every activation quant point.

The data source is not known here: `forward_loop(model)` is any callable that pushes calibration
batches through the model (see `text_forward_loop` / `image_forward_loop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mq_deploy.calib.observers import Observer
from mq_deploy.models.points import mixer_prefix


@dataclass(frozen=True)
class Window:
    """Which parts of a layer-streamed model are in memory (quant.streamed): `layers` (indices) and whether the
    ends (embedding, final norm, head) are. A model without `stream_window` is whole: everything is."""
    layers: frozenset = frozenset()
    ends: bool = False


def resident_layers(model) -> list:
    """(index, layer) of every layer in memory: all of them, or a streamed model's window."""
    w = getattr(model, "stream_window", None)
    return [(i, layer) for i, layer in enumerate(model.layers) if w is None or i in w.layers]


def ends_resident(model) -> bool:
    w = getattr(model, "stream_window", None)
    return w is None or w.ends


def mixers(model):
    """(prefix, mixer) for every Mamba mixer of an LM or a Vim (in memory: resident_layers)."""
    return [(mixer_prefix(i), layer.mixer) for i, layer in resident_layers(model)]


def calibrate(model, forward_loop: Callable, make_observers: Callable[[str], list]) -> dict:
    """Return {quant point name: [observers]}; make_observers(name) builds the observers of one point."""
    observers: dict = {}

    def hook_for(prefix):
        def hook(name, t):
            full = prefix + name
            if full not in observers:
                observers[full] = make_observers(full)
            for obs in observers[full]:
                obs.collect(t)
            return t
        return hook

    attached = mixers(model)
    try:
        for prefix, mixer in attached:
            mixer.act_hook = hook_for(prefix)
        model.calib_hook_for = hook_for      # a streamed loop's layers, read in while it runs (quant.streamed)
        with torch.no_grad():
            forward_loop(model)
    finally:
        del model.calib_hook_for
        for _, mixer in attached:
            mixer.act_hook = None
    if not observers:
        raise ValueError("calibration saw no data (the forward loop ran no batch)")
    return observers


def text_forward_loop(tokens, seq_len: int = 512, n_samples: int = 32, batch: int = 8):
    """Calibration windows from a byte array: n_samples consecutive windows of seq_len bytes."""
    import numpy as np

    from mq_deploy.data.text import windows

    w = windows(np.asarray(tokens), seq_len)[:n_samples, :seq_len]
    data = torch.from_numpy(w.astype(np.int64))

    def loop(model):
        for i in range(0, len(data), batch):
            model.backbone(data[i:i + batch])   # every quant point is inside the backbone
    loop.samples = len(data)
    loop.data, loop.batch = data, batch         # a layer-streamed quantize runs the same batches layer by layer
    return loop


def image_forward_loop(images: torch.Tensor, n_samples: int = 256, batch: int = 64):
    data = images[:n_samples]

    def loop(model):
        dtype = model.patch_embed.proj.weight.dtype    # a float64 model (invariance tests) gets float64 images
        for i in range(0, len(data), batch):
            model(data[i:i + batch].to(dtype))
    loop.samples = len(data)
    return loop


__all__ = ["Window", "calibrate", "ends_resident", "mixers", "resident_layers", "text_forward_loop",
           "image_forward_loop", "Observer"]
