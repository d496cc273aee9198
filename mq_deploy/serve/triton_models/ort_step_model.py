"""Triton Python-backend model written by `mq-deploy triton --backend python`: the stateful decode step
of an mq-deploy LM (input_ids + its states -> logits + the next states) in ONNX Runtime, behind Triton's
sequence batcher.

Triton's Python backend does not implement implicit state (it passes a state input in but cannot
update it), so this model keeps each sequence's states itself, in a dict keyed by the
CONTROL_SEQUENCE_CORRID tensor. START (re)initialises the states to zeros, END drops them, a request
without a live state is an error, and sequences idle longer than sequence_idle_us (the batcher's
max_sequence_idle_microseconds) or beyond max_sequences are dropped, oldest first. Triton sends every
request of a sequence to the same model instance, so a dict per instance suffices.

Batched decode across sequences: with max_batch_size > 0 the sequence batcher (strategy oldest) hands
one execute() the requests of up to max_batch_size different sequences. Those whose input length and
KV-cache lengths agree run as ONE ONNX Runtime call, their states stacked along each state's batch axis
(mq_batch.py: SSM states [layers, batch, ...], KV caches [batch, kv_heads, past, head_dim]); the others
(prefills of another length, a hybrid's sequences whose caches differ in length) run as their own
groups, nothing padded. A sequence that starts, ends or is missing in a round simply joins, leaves or
skips that round's stack; a request that fails its checks gets its own error and the rest go on.
Two requests of one sequence in one execute() run in order, in successive rounds.

Request: input_ids INT64 [1, seq] (the prompt as one prefill, then one token per step).
Response: logits FP32 [1, seq, vocab]: OrtRunner's on the same feeds, bit for bit when the sequence ran
alone; in a batch ONNX Runtime may block its GEMMs differently (docs/serving.md gives the measured
difference).
"""

import collections
import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # our helpers are copied beside us
from mq_batch import StateBatcher  # noqa: E402
from mq_ort_session import make_session, parameters  # noqa: E402


def _control(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy().reshape(-1)[0]


class _Step:
    __slots__ = ("index", "corr", "ids", "start", "end", "state")

    def __init__(self, index, corr, ids, start, end):
        self.index, self.corr, self.ids, self.start, self.end, self.state = index, corr, ids, start, end, None


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = parameters(self.config)
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        self.session = make_session(model_dir, params, self.name)
        self.max_sequences = int(params.get("max_sequences", "64"))
        self.idle_s = int(params.get("sequence_idle_us", "60000000")) / 1e6
        self.batcher = StateBatcher.of_session(self.session, json.loads(params["states"]))
        self.outputs = self.batcher.outputs()
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.states = collections.OrderedDict()    # corrid -> (SeqState, last use)

    def _evict(self, now):
        while self.states:
            corr, (_, t) = next(iter(self.states.items()))
            if now - t > self.idle_s or len(self.states) > self.max_sequences:
                del self.states[corr]
            else:
                break

    def _parse(self, k, request):
        corr = _control(request, "CORRID")
        if corr is None:
            corr = request.correlation_id()
        ready = _control(request, "READY")
        if ready is not None and not ready:     # an empty slot of the batcher: nothing to compute
            return None
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [1, seq] with seq >= 1 (one sequence per request), got "
                             f"{list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise ValueError(f"input_ids must lie in [0, {self.vocab}), got values in [{ids.min()}, {ids.max()}]")
        return _Step(k, int(corr), ids, bool(_control(request, "START")), bool(_control(request, "END")))

    def _error(self, e):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {str(e).splitlines()[0]}"))

    def _round(self, steps, responses, now):
        """Steps of distinct sequences: grouped by input and cache length, one ORT call per group."""
        live = []
        for s in steps:
            if s.start:
                s.state = self.batcher.zeros()
            else:
                entry = self.states.get(s.corr)
                if entry is None:
                    responses[s.index] = self._error(
                        f"sequence {s.corr} has no state on the server: its first request must set sequence_start, "
                        f"and it must not stay idle longer than {self.idle_s:.0f} s")
                    continue
                s.state = entry[0]
            live.append(s)
        self.batcher.run_round(live, lambda group: self._run(group, responses, now),
                               lambda s, e: responses.__setitem__(s.index, self._error(e)))

    def _run(self, group, responses, now):
        def run(feeds):
            return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))

        res, nxt = self.batcher.call(run, [s.ids for s in group], [s.state for s in group],
                                     [f"sequence {s.corr}" for s in group])
        logits = res["logits"]
        done = [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "logits", logits if len(group) == 1 else logits[k:k + 1])]) for k in range(len(group))]
        for k, s in enumerate(group):       # nothing above changed a state: a failure retries each alone
            self.states.pop(s.corr, None)
            if not s.end:
                self.states[s.corr] = (nxt[k], now)
            responses[s.index] = done[k]

    def execute(self, requests):
        responses = [None] * len(requests)
        steps = []
        for k, r in enumerate(requests):
            try:
                s = self._parse(k, r)
            except Exception as e:
                responses[k] = self._error(e)
                continue
            if s is None:
                responses[k] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("logits", np.zeros((1, 1, self.vocab), np.float32))])
            else:
                steps.append(s)
        now = time.monotonic()
        while steps:            # one step per sequence per round, in arrival order
            seen, this, later = set(), [], []
            for s in steps:
                (later if s.corr in seen else this).append(s)
                seen.add(s.corr)
            self._round(this, responses, now)
            steps = later
        self._evict(now)
        return responses

    def finalize(self):
        self.states.clear()
        self.session = None
