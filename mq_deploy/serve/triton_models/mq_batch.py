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
    the same sequences in the same order feeds those arrays back without a copy, and a round with some of
    them gathers them in one take per state. `checked`: the batcher that made it (zeros, split), whose stack
    need not check it against its layout again at every round."""

    whole = None
    checked = None


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
        s = SeqState({name: np.zeros([1 if j == self.batch_axis[name] else cache_slots if d is None else d
                                      for j, d in enumerate(dims)], dtype)
                      for name, _, dims, dtype in self.layout})
        s.checked = self
        return s

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
        key = self.group_key(first)        # () when no state grows
        for k, s in enumerate(states):
            if getattr(s, "checked", None) is not self:
                for name, _, _, _ in self.layout:
                    a, b = s.get(name), first.get(name)
                    if a is not None and b is not None and a.dtype != b.dtype:
                        raise ValueError(f"a batch mixes state dtypes: {names[k]}'s {name} is {a.dtype}, "
                                         f"{names[0]}'s {b.dtype}")
                self.check(s, names[k])
            if key and self.group_key(s) != key:
                raise ValueError(f"{names[k]} and {names[0]} cannot share a batch: their KV caches are "
                                 f"{self.group_key(s)} and {key} long")
        w = getattr(first, "whole", None)
        if w is not None and all(getattr(s, "whole", None) is not None and s.whole[0] is w[0] for s in states):
            if w[2] == len(states) and all(s.whole[1] == k for k, s in enumerate(states)):
                return dict(w[0])       # the same sequences in the same order as the batch they came from
            if len(states) > 1:         # some of that batch's sequences: one take per state
                idx = np.fromiter((s.whole[1] for s in states), np.intp, len(states))
                return {name: np.take(w[0][name], idx, axis=self.batch_axis[name])
                        for name, _, _, _ in self.layout}
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
            s.whole, s.checked = (whole, 0, 1), self
            return [s]
        out = []
        for k in range(n):
            s = SeqState({name: a[(slice(None),) * self.batch_axis[name] + (slice(k, k + 1),)]
                          for name, a in whole.items()})
            s.whole, s.checked = (whole, k, n), self
            out.append(s)
        return out


def greedy(logits) -> list:
    """Each sequence's greedy token from a step's logits [n, len, vocab] (the argmax of its last position), or None
    where those logits are not finite."""
    last = logits[:, -1]
    return [int(t) if ok else None for t, ok in zip(last.argmax(-1), np.isfinite(last).all(-1))]


def not_finite(at: int) -> str:
    """The error line of a generation whose logits are not finite at its new token `at` (1-based)."""
    return f"the logits are not finite at new token {at}; the model's weights or scales overflow float32"


class Generation:
    """One greedy generation: its next input (`ids`, the prompt first), the tokens it may still make (`left`),
    its states, and its outbox: the tokens made and not yet taken by the thread that sends them (`out`), `done`
    once no more will come, `error` (a message) if it failed, `stop` once its client is gone. `ctx` is the
    sender's (the Triton response sender and the text stream)."""

    __slots__ = ("name", "ids", "left", "eos", "state", "out", "done", "error", "stop", "taken", "queued", "since",
                 "ctx")

    def __init__(self, name, prompt, max_new_tokens, eos=None, ctx=None):
        self.name, self.left, self.eos, self.ctx = name, int(max_new_tokens), eos, ctx
        self.ids = np.asarray(prompt, np.int64).reshape(1, -1)
        self.state, self.out, self.error = None, [], None
        self.done = self.left <= 0
        self.stop = self.queued = False
        self.taken = 0                  # tokens handed to the sender so far
        self.since = 0.0                # when its oldest waiting token was made (Outbox)


class Outbox:
    """Where a generation's tokens wait between the thread that makes them (a DecodeEngine, or one thread per
    generation) and the one thread that sends them, which takes every token a generation made since its last
    response at once, one response for all of them. A generation's news is due to the sender
    - at once: its first token (time to first token is what a waiting client sees), its end, or `room` tokens
      waiting (the producer then skips that generation's steps until the sender takes them);
    - else once its oldest waiting token has waited `interval_s`, oldest first; with more than `streams`
      generations waiting so, the wait grows in proportion (interval_s * waiting / streams): a response budget
      shared by all streams, about `streams` responses per interval however many streams run.
    So while tokens come slower than one per interval (a large model) each response holds one token; a model
    faster than that sends a response per interval per stream, and the per-response costs (IPC to the server,
    gRPC, the client) stop growing with the tokens (vLLM's stream interval, in time rather than tokens); past
    `streams` streams they stop growing with the streams too (without the budget, 64 streams sent 4 times the
    responses of 16 with a quarter of the tokens each, and served fewer tokens/s than 16: docs/serving.md). A
    sender that falls behind takes several tokens per response anyway. interval_s 0: every token is due at
    once; room 1: a response per token, the steps wait for the sends. One lock and condition for all of it
    (`cv`): its holders only move lists."""

    def __init__(self, room: int, interval_s: float, streams: int = 16):
        if int(room) < 1:
            raise ValueError(f"room must be at least 1 token, got {room}")
        if not 0 <= float(interval_s) <= 1:
            raise ValueError(f"interval_s must lie in [0, 1] s, got {interval_s}")
        if int(streams) < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        self.room, self.interval_s, self.streams = int(room), float(interval_s), int(streams)
        self.cv = threading.Condition()
        # generations with news: a first token; due at once; due at since + interval
        self._fresh, self._due, self._timed = [], [], []
        self.closing = False                    # no new tokens: producers end their generations
        self._closed = False                    # nothing more will be put: get() returns None once drained

    def _queue(self, g):
        """Under the lock: g has news (put, or a producer changed g.out / g.done itself)."""
        urgent = g.taken == 0 or g.done or len(g.out) >= self.room or not self.interval_s
        if g.queued == "timed" and urgent:
            self._timed.remove(g)
            g.queued = False
        if not g.queued:
            if urgent:
                g.queued = "due"
                (self._fresh if g.taken == 0 else self._due).append(g)
            else:
                g.queued, g.since = "timed", time.monotonic()
                self._timed.append(g)
            self.cv.notify_all()

    def put(self, g, tokens=(), done=False, error=None) -> None:
        """New tokens of g, and whether it is over (with an error message, if it failed)."""
        with self.cv:
            g.out.extend(tokens)
            if error is not None and g.error is None:
                g.error = error
            g.done = g.done or done or error is not None
            self._queue(g)

    def get(self, timeout=None):
        """(generation, its tokens not taken yet, done, error) of the next generation whose news is due, waiting
        for one; None once close() was called and every news was taken, or after `timeout` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            while True:
                now = time.monotonic()
                if self._fresh or self._due:
                    g = (self._fresh or self._due).pop(0)
                    break
                wait_s = self.interval_s * max(1.0, len(self._timed) / self.streams)   # the shared budget
                if self._timed and (self._closed or self._timed[0].since + wait_s <= now):
                    g = self._timed.pop(0)
                    break
                if self._closed and not self._timed or end is not None and now >= end:
                    return None
                wake = [t for t in (end, self._timed[0].since + wait_s if self._timed else None) if t]
                self.cv.wait(max(min(wake) - now, 0) if wake else None)
            g.queued = False
            toks, g.out = g.out, []
            g.taken += len(toks)
            if toks:
                self.cv.notify_all()            # room again: a producer may be waiting for it
            return g, toks, g.done, g.error

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_room(self, g) -> bool:
        """A producer thread's wait until g has room for a token; False once g stopped or the outbox closes."""
        with self.cv:
            while len(g.out) >= self.room and not (g.stop or self.closing):
                self.cv.wait()
            return not (g.stop or self.closing)

    def stop(self, g) -> None:
        """The sender's: g's client is gone; its producer ends it (put done) at its next step."""
        with self.cv:
            g.stop = True
            self.cv.notify_all()

    def begin_close(self) -> None:
        """Producers end their generations at their next step (put done); the sender sends what comes."""
        with self.cv:
            self.closing = True
            self.cv.notify_all()

    def close(self) -> None:
        """Every producer has ended: get() returns None once the news left is taken."""
        with self.cv:
            self.closing = self._closed = True
            self.cv.notify_all()


class DecodeEngine:
    """Greedy decoding of many generations on one thread (the inline generate model's): each round takes every
    running generation with room in its outbox, groups them as the step model groups a round (StateBatcher:
    input length, KV-cache lengths; prefills first), runs one step-graph call per group with the states stacked,
    picks each sequence's token (argmax of its last logits) and puts it in the outbox. No thread per generation
    and no hand-off per step: a round is one call for all sequences, and the sender (another thread) works while
    the next round runs, since ONNX Runtime and the Python backend's sends both release the GIL. At most
    `max_active` generations run; the others wait in arrival order. A group whose call fails is retried sequence
    by sequence, so a bad sequence gets its own error and the others go on; a sequence whose logits are not
    finite ends with an error. run(feeds) -> {output: array}: the step graph; on_call(n): after each call that
    ran n sequences' steps (the generate model's metrics)."""

    def __init__(self, run, batcher, outbox, max_active: int, on_call=None):
        self._run, self.batcher, self.outbox, self._on_call = run, batcher, outbox, on_call
        self.max_active = int(max_active)
        self._waiting, self._active = [], []
        self.calls = self.steps = 0        # step-graph calls and sequence steps so far
        self._thread = threading.Thread(target=self._loop, name="mq-decode-engine", daemon=True)
        self._thread.start()

    def add(self, g) -> None:
        with self.outbox.cv:
            if self.outbox.closing:
                g.error = g.error or "the model is unloading"
                g.done = True
            if g.done:
                self.outbox._queue(g)
                return
            self._waiting.append(g)
            self.outbox.cv.notify_all()

    def join(self, timeout=None) -> None:
        """After outbox.begin_close(): the engine ends every generation (done) and its thread returns."""
        self._thread.join(timeout)

    def _take_round(self):
        """Under the lock: admit waiting generations, end stopped ones, and return the round's generations (an
        empty list: the outbox is closing and every generation has been ended)."""
        ob = self.outbox
        while True:
            if ob.closing:
                for g in self._active + self._waiting:
                    g.state = None
                    g.done = True
                    ob._queue(g)
                self._active, self._waiting = [], []
                return []
            while self._waiting and len(self._active) < self.max_active:
                self._active.append(self._waiting.pop(0))
            keep = []
            for g in self._active:
                if g.stop:
                    g.state, g.done = None, True
                    ob._queue(g)
                else:
                    keep.append(g)
            self._active = keep
            batch = [g for g in keep if len(g.out) < ob.room]
            if batch:
                return batch
            ob.cv.wait()

    def _loop(self):
        while True:
            with self.outbox.cv:
                batch = self._take_round()
            if not batch:
                return
            for g in batch:
                if g.state is None:
                    g.state = self.batcher.zeros()
            self.batcher.run_round(batch, self._call, lambda g, e: self._made([(g, None, str(e).splitlines()[0]
                                                                                or type(e).__name__)]))

    def _made(self, results):
        """A group's results [(generation, token or None, error or None)] into the outbox at once: a prefill's
        first token goes out while the round's other groups still run."""
        with self.outbox.cv:
            for g, tok, error in results:
                if error is not None:
                    g.state, g.error, g.done = None, error, True
                else:
                    g.out.append(tok)
                    g.left -= 1
                    if g.left <= 0 or tok == g.eos:
                        g.state, g.done = None, True
                    else:
                        g.ids = np.asarray([[tok]], np.int64)
                if g.done:
                    self._active.remove(g)
                self.outbox._queue(g)

    def _call(self, group):
        res, nxt = self.batcher.call(self._run, [g.ids for g in group], [g.state for g in group],
                                     [g.name for g in group])
        results = []
        for k, (g, tok) in enumerate(zip(group, greedy(res["logits"]))):
            if tok is not None:             # nothing above changed a state: a failure retries each alone
                g.state = nxt[k]
                results.append((g, tok, None))
            else:
                results.append((g, None, f"{g.name}: {not_finite(g.taken + len(g.out) + 1)}"))
        self.calls += 1
        self.steps += len(group)
        self._made(results)
        if self._on_call is not None:
            try:
                self._on_call(len(group))
            except Exception:           # counting (the server's metrics) never fails a step that ran
                pass
