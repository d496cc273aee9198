"""The parallel block in PyTorch: `self_attn` (families/attention) and `mamba` (families/mamba2) on the same
input, outputs summed. The children are the families' own modules (parameter names as transformers'
Falcon-H1: self_attn.q_proj, mamba.in_proj, ...); the block shares its quant hook with them and exposes
their weights under the flat site names the family declares (q_proj, ..., in_proj, conv1d, out_proj)."""

from __future__ import annotations

import weakref

import torch

from mq_deploy.families.attention.mixer import Attention
from mq_deploy.families.mamba2.mixer import Mamba2Mixer
from mq_deploy.families.parallel.config import ParallelConfig
from mq_deploy.models.layers import MixerBase
from mq_deploy.ops.hadamard import hadamard_matrix

_HADAMARD = weakref.WeakValueDictionary()     # (n, dtype) -> the one runtime matrix the live models share


def shared_hadamard(n: int, dtype) -> torch.Tensor:
    """The normalised Hadamard matrix of size n in `dtype`, one tensor for every block that uses it (as the
    recipes share one per width: a matrix per layer would cost d_ssm^2 per layer for nothing)."""
    key = (n, dtype)
    H = _HADAMARD.get(key)
    if H is None:
        H = torch.from_numpy(hadamard_matrix(n)).to(dtype)
        _HADAMARD[key] = H
    return H


def _child(name: str, attr: str):
    return property(lambda self: getattr(getattr(self, name), attr))


class CompositeMixer(MixerBase):
    """A block made of child mixers (this family's attention + Mamba2; Zamba2's layer), each with its own output
    projection: one act_hook seen by every child (their point names do not collide), and the children's
    online rotations of a quantized checkpoint filled once the model is materialised. Subclasses list their
    children in children_mixers()."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._hadamard_pending = False       # folds.add_runtime_buffers: fill the children's rotations on load

    def children_mixers(self) -> tuple:
        raise NotImplementedError

    @property
    def act_hook(self):
        return self.__dict__.get("_act_hook")

    @act_hook.setter
    def act_hook(self, fn):
        self.__dict__["_act_hook"] = fn
        for child in self._modules.values():
            if isinstance(child, MixerBase):
                child.act_hook = fn

    def _apply(self, fn, recurse=True):
        # a quantized checkpoint's online rotations are declared on the meta device (shapes only) and filled
        # here once the model is materialised (to_empty): the Hadamard matrices are not stored in the file
        out = super()._apply(fn, recurse)
        if self._hadamard_pending and self.children_mixers()[0].out_rotation.device.type != "meta":
            for child in self.children_mixers():
                r = child.out_rotation
                child.register_buffer("out_rotation", shared_hadamard(r.shape[0], r.dtype), persistent=False)
            self._hadamard_pending = False
        return out


class ParallelMixer(CompositeMixer):
    # the weight sites, as the family names them (quant/fakequant, GPTQ and mse-out find them by these names)
    q_proj, k_proj, v_proj, o_proj = (_child("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    in_proj, conv1d, out_proj = (_child("mamba", n) for n in ("in_proj", "conv1d", "out_proj"))

    def __init__(self, cfg: ParallelConfig):
        super().__init__(cfg)
        self.self_attn = Attention(cfg.attention)
        self.mamba = Mamba2Mixer(cfg.mamba)

    def children_mixers(self) -> tuple:
        return (self.self_attn, self.mamba)

    def readers(self) -> list:
        return self.self_attn.readers() + self.mamba.readers()

    def writers(self) -> list:
        return [self.self_attn.out_linear, self.mamba.out_linear]

    @property
    def out_linear(self):
        """None: the block has two output projections; each child carries its own online rotation
        (set by this family's recipe hooks, families/parallel/folds.py)."""
        return None

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        self.self_attn.reset_parameters(generator=generator)
        self.mamba.reset_parameters(generator=generator)

    def forward(self, hidden, state=None, return_state=False):
        """hidden [b, L, d] -> [b, L, d]. state/return_state: (conv_state, ssm_state, past_key, past_value)."""
        if state is None:
            ms, at = None, None
        else:
            ms, at = tuple(state[:2]), tuple(state[2:])
        ym = self.mamba(hidden, ms, return_state)
        ya = self.self_attn(hidden, at, return_state)
        if not return_state:
            return ym + ya
        (ym, (conv, ssm)), (ya, (k, v)) = ym, ya
        return ym + ya, (conv, ssm, k, v)

    def step(self, hidden, conv_state, ssm_state, past_key, past_value):
        ym, conv, ssm = self.mamba.step(hidden, conv_state, ssm_state)
        ya, k, v = self.self_attn.step(hidden, past_key, past_value)
        return ym + ya, conv, ssm, k, v
