"""Expert weights as the MoE block holds them ([experts * out, in], expert after expert), from the layouts
checkpoints store them in: one tensor per expert (experts.{e}.up_proj.weight [out, in]), one 3-D tensor
([experts, out, in]), or a 3-D tensor whose rows fuse two projections per expert (Granite's input_linear
[experts, 2 * d_ff, d]: gate then up). Shapes are checked from the headers, before anything is read."""

from __future__ import annotations

import re

import torch

from mq_deploy.errors import MQUserError
from mq_deploy.models.loaders import TensorSource, shown


class ExpertsSource(TensorSource):
    """`base` with expert tensors rewritten:

    stack:   [(regex with groups `pre` and `e` (the expert index), replacement of the whole name)]: every
             per-expert tensor of one target concatenated along rows, experts 0 .. n-1 all present;
    flatten: [(regex, replacement)]: a [experts, out, in] tensor as [experts * out, in];
    split:   [(regex, [(replacement, index, count)])]: a [experts, rows, in] tensor's index-th of count
             row blocks of every expert, as [experts * rows / count, in]."""

    def __init__(self, base: TensorSource, stack=(), flatten=(), split=()):
        super().__init__()
        self.base, self.plans = base, {}
        groups = {}
        for k in base.shapes:
            new = self._match(k, base, stack, flatten, split, groups)
            if not new:
                self.shapes[k], self.dtypes[k], self.origin[k] = base.shapes[k], base.dtypes[k], base.origin[k]
        for new, members in groups.items():
            idx = sorted(members)
            if idx != list(range(len(idx))):
                missing = next(i for i in range(len(idx) + 1) if i not in members)
                raise MQUserError(f"{shown(base.origin[members[idx[0]]])}: the experts of {new} are not numbered "
                                  f"0 .. {len(idx) - 1} (expert {missing} is missing)")
            keys = [members[i] for i in idx]
            shapes = {tuple(base.shapes[k]) for k in keys}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise MQUserError(f"{shown(base.origin[keys[0]])}: the experts of {new} differ in shape or are not "
                                  f"matrices ({sorted(shapes)})")
            out, inp = next(iter(shapes))
            self.plans[new] = ("stack", keys)
            self._set(new, keys[0], (len(keys) * out, inp))

    def _set(self, new, old, shape):
        self.shapes[new], self.dtypes[new], self.origin[new] = shape, self.base.dtypes[old], self.base.origin[old]

    def _match(self, k, base, stack, flatten, split, groups) -> bool:
        for pat, rep in stack:
            m = re.search(pat, k)
            if m:
                new = re.sub(pat, rep, k)
                groups.setdefault(new, {})[int(m.group("e"))] = k
                return True
        shape = tuple(base.shapes[k])
        for pat, rep in flatten:
            if re.search(pat, k):
                self._check3(k, shape)
                new = re.sub(pat, rep, k)
                self.plans[new] = ("flatten", k)
                self._set(new, k, (shape[0] * shape[1], shape[2]))
                return True
        for pat, parts in split:
            if re.search(pat, k):
                self._check3(k, shape)
                for rep, i, count in parts:
                    if shape[1] % count:
                        raise MQUserError(f"{shown(base.origin[k])}: tensor {k} has {shape[1]} rows per expert, "
                                          f"not {count} equal parts")
                    n = shape[1] // count
                    new = re.sub(pat, rep, k)
                    self.plans[new] = ("split", k, i * n, (i + 1) * n)
                    self._set(new, k, (shape[0] * n, shape[2]))
                return True
        return False

    def _check3(self, k, shape):
        if len(shape) != 3:
            raise MQUserError(f"{shown(self.base.origin[k])}: tensor {k} has shape {shape}, not "
                              "[experts, out, in]")

    def get(self, name):
        plan = self.plans.get(name)
        if plan is None:
            return self.base.get(name)
        if plan[0] == "stack":
            return torch.cat([self.base.get(k) for k in plan[1]], 0)
        t = self.base.get(plan[1])
        if plan[0] == "flatten":
            return t.reshape(-1, t.shape[-1])
        return t[:, plan[2]:plan[3]].reshape(-1, t.shape[-1])
