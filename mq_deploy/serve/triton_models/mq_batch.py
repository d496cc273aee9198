"""Decode states of several sequences stacked into one batch of a step graph, and split back: the one
place both the served step model (ort_step_model.py, which `mq-deploy triton` copies this file beside)
and the in-process batched `generate` (mq_deploy.runtime.apps.generate_batch) do it. numpy only: it runs
inside tritonserver's Python stub, where mq_deploy is not installed.

A layout is [(input, output, dims, dtype)] as mq_deploy.families.state_inputs decides it: dims are ints,
with None for the batch (the first None: an SSM state is [layers, batch, ...], a KV cache [batch, ...])
and for a KV cache's growing length. Sequences stack along their batch axis when their growing lengths
agree (group_key); nothing is padded.
"""

import threading
import time

import numpy as np


class SeqState(dict):
    """One sequence's states {input: array with batch 1}, as split() hands them out: views into the batch
    they came from (`whole`: (that batch's arrays, this sequence's index, batch size)), so a round with
    the same sequences in the same order feeds those arrays back without a copy."""

    whole = None


# the element types a state may have: float32, float16 or int8 (export --state-dtype; an int8 KV cache)
STATE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


class StateBatcher:
    @classmethod
    def of_session(cls, session, pairs):
        """The batcher of an ONNX Runtime session's step graph: pairs [[input, output]] of its states (the
        `states` parameter `mq-deploy triton` writes from the family's layout), shaped as the graph declares
        them (SSM states [layers, batch, ...], fixed; a KV cache's length grows from 0). ValueError: a state
        of another element type."""
        inputs = {i.name: i for i in session.get_inputs()}
        layout = []
        for name, out in pairs:
            kind = inputs[name].type if name in inputs else None
            if kind not in STATE_TYPES:
                raise ValueError(f"state {name} is {kind}; a step graph's states are float32, float16 or int8")
            layout.append((name, out, [d if isinstance(d, int) else None for d in inputs[name].shape],
                           STATE_TYPES[kind]))
        return cls(layout)

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

    def outputs(self) -> list:
        """The step graph's outputs: logits, then each state's next value in layout order."""
        return ["logits"] + [out for _, out, _, _ in self.layout]

    def call(self, run, ids, states, names) -> tuple:
        """One step-graph call for several sequences: run(feeds) -> {output: array} on input_ids [n, len] (a
        list of [1, len] rows) and their states stacked; returns (its outputs, the n next SeqStates)."""
        feeds = self.stack(states, names)
        res = run({"input_ids": ids[0] if len(ids) == 1 else np.concatenate(ids), **feeds})
        return res, self.split(res, len(ids))

    def run_round(self, items, call, fail) -> None:
        """A round of steps of distinct sequences (items with .ids [1, len] and .state): grouped by input length
        and KV-cache lengths (group_key), prefills first (a new stream's first token waits for them, a running
        stream only for its next step), call(group) once per group; a group whose call fails is retried item by
        item, so one bad sequence gets fail(item, error) and the others go on."""
        groups = {}
        for it in items:
            groups.setdefault((it.ids.shape[1], self.group_key(it.state)), []).append(it)
        for group in sorted(groups.values(), key=lambda g: g[0].ids.shape[1] == 1):
            try:
                call(group)
            except Exception as e:
                if len(group) == 1:
                    fail(group[0], e)
                    continue
                for it in group:
                    try:
                        call([it])
                    except Exception as e1:   # a bad state, or ONNX Runtime's message naming the input
                        fail(it, e1)

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


class Sequence:
    """One sequence of a BatchedStepper: its states between steps (None until its first step)."""

    __slots__ = ("name", "state", "closed")

    def __init__(self, name):
        self.name, self.state, self.closed = name, None, False


class _Pending:
    __slots__ = ("seq", "ids", "logits", "error", "done")

    def __init__(self, seq, ids):
        self.seq, self.ids, self.logits, self.error, self.done = seq, ids, None, None, False

    @property
    def state(self):
        return self.seq.state


class BatchedStepper:
    """The decode steps of many threads' sequences, run as few step-graph calls: each thread opens a
    Sequence, calls step(seq, ids) for its prompt and then each token (blocking, returns the logits
    [1, len(ids), vocab]) and closes it. The generate model (generate_model.py) runs its generations
    this way when it runs the step graph itself (no BLS request, no step-model process per token).

    There is no scheduler thread: a caller whose step is pending and finds no round running runs one
    (leader/followers). It first waits, at most max_wait_s from its own arrival, until every open
    sequence has a step pending (at one sequence: not at all), takes every pending step, groups them
    as ort_step_model.py does (input length, KV-cache lengths; prefills first), runs one call per group
    with the states stacked (StateBatcher) and hands each caller its logits. A group whose call fails
    is retried sequence by sequence, so a bad sequence gets its own error and the others go on.
    run(feeds) -> {output: array}: the step graph (feeds: input_ids and the states by input name);
    on_call(n): called after each call that ran n sequences' steps (the generate model's metrics)."""

    def __init__(self, run, batcher, max_wait_s: float = 0.001, on_call=None):
        self._run, self.batcher, self.max_wait_s, self._on_call = run, batcher, float(max_wait_s), on_call
        self._cv = threading.Condition()
        self._pending = []
        self._open = 0
        self._busy = False
        self.calls = self.steps = 0        # step-graph calls and sequence steps so far (for the bench)

    def open(self, name="a sequence") -> Sequence:
        with self._cv:
            self._open += 1
        return Sequence(name)

    def close(self, seq) -> None:
        """The sequence's states are dropped; its slot no longer holds back a round."""
        with self._cv:
            if not seq.closed:
                seq.closed, seq.state = True, None
                self._open -= 1
                self._cv.notify_all()

    def step(self, seq, ids):
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        if seq.closed:
            raise ValueError(f"{seq.name} is closed")
        p = _Pending(seq, ids)
        arrived = time.monotonic()
        with self._cv:
            self._pending.append(p)
            self._cv.notify_all()
            while not p.done:
                if self._busy:
                    self._cv.wait()
                    continue
                left = arrived + self.max_wait_s - time.monotonic()
                if len(self._pending) < self._open and left > 0:
                    self._cv.wait(left)         # the other open sequences' steps, for one round
                    continue
                batch, self._pending, self._busy = self._pending, [], True
                self._cv.release()
                try:
                    self._round(batch)
                finally:
                    self._cv.acquire()
                    self._busy = False
                    self._cv.notify_all()
        if p.error is not None:
            raise p.error
        return p.logits

    def _round(self, batch):
        for p in batch:
            if p.seq.state is None:
                p.seq.state = self.batcher.zeros()
        self.batcher.run_round(batch, self._call, lambda p, e: setattr(p, "error", e))
        for p in batch:
            p.done = True

    def _call(self, group):
        res, nxt = self.batcher.call(self._run, [p.ids for p in group], [p.seq.state for p in group],
                                     [p.seq.name for p in group])
        logits = res["logits"]
        for k, p in enumerate(group):       # nothing above changed a state: a failure retries each alone
            if not p.seq.closed:
                p.seq.state = nxt[k]
            p.logits = logits if len(group) == 1 else logits[k:k + 1]
        self.calls += 1
        self.steps += len(group)
        if self._on_call is not None:
            try:
                self._on_call(len(group))
            except Exception:           # counting (the server's metrics) never fails a step that ran
                pass
