"""Decode states of several sequences stacked into one batch of a step graph, and split back: the one
place both the served step model (ort_step_model.py, which `mq-deploy triton` copies this file beside)
and the in-process batched `generate` (mq_deploy.runtime.apps.generate_batch) do it. numpy only: it runs
inside tritonserver's Python stub, where mq_deploy is not installed.

A layout is [(input, output, dims, dtype)] as mq_deploy.families.state_inputs decides it: dims are ints,
with None for the batch (the first None: an SSM state is [layers, batch, ...], a KV cache [batch, ...])
and for a KV cache's growing length. Sequences stack along their batch axis when their growing lengths
agree (group_key); nothing is padded.
"""

import numpy as np


class SeqState(dict):
    """One sequence's states {input: array with batch 1}, as split() hands them out: views into the batch
    they came from (`whole`: (that batch's arrays, this sequence's index, batch size)), so a round with
    the same sequences in the same order feeds those arrays back without a copy."""

    whole = None


class StateBatcher:
    def __init__(self, layout):
        self.layout = []
        for name, out, dims, dtype in layout:
            dims = tuple(None if d is None else int(d) for d in dims)
            if None not in dims:
                raise ValueError(f"state {name}: its dimensions {list(dims)} have no batch axis")
            self.layout.append((name, out, dims, np.dtype(dtype)))
        self.batch_axis = {name: dims.index(None) for name, _, dims, _ in self.layout}
        self.grows = {name: tuple(j for j, d in enumerate(dims) if d is None and j != self.batch_axis[name])
                      for name, _, dims, _ in self.layout}

    def zeros(self, cache_slots: int = 0) -> SeqState:
        """A fresh sequence's states: zeros, a KV cache `cache_slots` long."""
        return SeqState({name: np.zeros([1 if j == self.batch_axis[name] else cache_slots if d is None else d
                                         for j, d in enumerate(dims)], dtype)
                         for name, _, dims, dtype in self.layout})

    def check(self, state, who: str = "a sequence") -> None:
        """One sequence's states against the layout: every input, its dtype, rank, fixed sizes, batch 1."""
        for name, _, dims, dtype in self.layout:
            a = state.get(name)
            if a is None:
                raise ValueError(f"{who}: no {name} state")
            shape = tuple(a.shape)
            if a.dtype != dtype:
                raise ValueError(f"{who}: state {name} is {a.dtype}, the step graph takes {dtype}")
            want = [1 if j == self.batch_axis[name] else "*" if d is None else d for j, d in enumerate(dims)]
            if len(shape) != len(dims) or any(w != "*" and w != s for w, s in zip(want, shape)):
                raise ValueError(f"{who}: state {name} is {list(shape)}, the step graph takes "
                                 f"[{', '.join(str(w) for w in want)}] for one sequence")
        extra = sorted(set(state) - {name for name, _, _, _ in self.layout})
        if extra:
            raise ValueError(f"{who}: unknown state {extra[0]}")

    def group_key(self, state) -> tuple:
        """Sequences whose key agrees stack into one batch: the growing lengths of their KV caches."""
        return tuple(state[name].shape[j] for name, _, _, _ in self.layout for j in self.grows[name])

    def stack(self, states, names=None) -> dict:
        """{input: batch} of several sequences' states, in order; each checked, and a batch that mixes state
        dtypes or cache lengths refused with one line (ValueError) naming the sequences."""
        states = list(states)
        names = list(names) if names is not None else [f"sequence {k}" for k in range(len(states))]
        if not states:
            raise ValueError("no sequences to stack")
        first = states[0]
        for k, s in enumerate(states):
            for name, _, _, _ in self.layout:
                a, b = s.get(name), first.get(name)
                if a is not None and b is not None and a.dtype != b.dtype:
                    raise ValueError(f"a batch mixes state dtypes: {names[k]}'s {name} is {a.dtype}, {names[0]}'s "
                                     f"{b.dtype}")
            self.check(s, names[k])
            if self.group_key(s) != self.group_key(first):
                raise ValueError(f"{names[k]} and {names[0]} cannot share a batch: their KV caches are "
                                 f"{self.group_key(s)} and {self.group_key(first)} long")
        w = getattr(first, "whole", None)
        if (w is not None and w[2] == len(states)
                and all(getattr(s, "whole", None) is not None and s.whole[0] is w[0] and s.whole[1] == k
                        for k, s in enumerate(states))):
            return dict(w[0])           # the same sequences in the same order as the batch they came from
        if len(states) == 1:
            return {name: np.ascontiguousarray(first[name]) for name, _, _, _ in self.layout}
        return {name: np.concatenate([s[name] for s in states], axis=self.batch_axis[name])
                for name, _, _, _ in self.layout}

    def split(self, outputs: dict, n: int) -> list:
        """The step graph's state outputs {output: batch of n} -> n SeqStates {input: view with batch 1}."""
        whole = {name: outputs[out] for name, out, _, _ in self.layout}
        for name, a in whole.items():
            if a.shape[self.batch_axis[name]] != n:
                raise ValueError(f"state output of {name} holds {a.shape[self.batch_axis[name]]} sequences, "
                                 f"expected {n}")
        if n == 1:
            s = SeqState(whole)
            s.whole = (whole, 0, 1)
            return [s]
        out = []
        for k in range(n):
            s = SeqState({name: a[(slice(None),) * self.batch_axis[name] + (slice(k, k + 1),)]
                          for name, a in whole.items()})
            s.whole = (whole, k, n)
            out.append(s)
        return out
