"""Triton Python-backend model written by `mq-deploy triton --backend python`: the stateful decode step
of an mq-deploy LM (input_ids, conv_state, ssm_state -> logits, conv_state_out, ssm_state_out) in
ONNX Runtime, behind Triton's sequence batcher.

Triton's Python backend does not implement implicit state (it passes a state input in but cannot
update it), so this model keeps each sequence's conv/ssm state itself, in a dict keyed by the
CONTROL_SEQUENCE_CORRID tensor. START (re)initialises the state to zeros, END drops it, a request
without a live state is an error, and sequences idle longer than sequence_idle_us (the batcher's
max_sequence_idle_microseconds) or beyond max_sequences are dropped, oldest first. Triton sends every
request of a sequence to the same model instance, so a dict per instance suffices.

Request: input_ids INT64 [1, seq] (the prompt as one prefill, then one token per step).
Response: logits FP32 [1, seq, vocab], computed exactly as mq_deploy's OrtRunner on the same feeds.
"""

import collections
import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # mq_ort_session.py is copied beside us
from mq_ort_session import make_session, parameters  # noqa: E402

# the element types a state may have: float32, or int8 (an attention layer's int8 KV cache)
_STATE_TYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8}


def _control(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = parameters(self.config)
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        self.session = make_session(model_dir, params, self.name)
        self.max_sequences = int(params.get("max_sequences", "64"))
        self.idle_s = int(params.get("sequence_idle_us", "60000000")) / 1e6
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        types = {i.name: i.type for i in self.session.get_inputs()}
        # the states: [input, output] pairs `mq-deploy triton` wrote from the model family's layout, shaped as
        # the step graph declares them with batch 1 per sequence (SSM states [layers, batch, ...], fixed) and a
        # KV cache's growing length 0 at a sequence's start
        self.pairs = [tuple(p) for p in json.loads(params["states"])]
        self.empty, self.dtypes = {}, {}
        for name, _ in self.pairs:
            if types[name] not in _STATE_TYPES:
                raise ValueError(f"state {name} is {types[name]}; this model keeps float32 or int8 states")
            self.dtypes[name] = _STATE_TYPES[types[name]]
            dims = shapes[name]
            batch_axis = next(j for j, d in enumerate(dims) if not isinstance(d, int))
            self.empty[name] = [1 if j == batch_axis else int(d) if isinstance(d, int) else 0
                                for j, d in enumerate(dims)]
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.states = collections.OrderedDict()    # corrid -> ({input: state}, last use)

    def _evict(self, now):
        while self.states:
            corr, (_, t) = next(iter(self.states.items()))
            if now - t > self.idle_s or len(self.states) > self.max_sequences:
                del self.states[corr]
            else:
                break

    def _step(self, request):
        corr = _control(request, "CORRID")
        if corr is None:
            corr = request.correlation_id()
        corr = int(corr)
        start, end = _control(request, "START"), _control(request, "END")
        ready = _control(request, "READY")
        if ready is not None and not ready:     # an empty slot of the batcher: nothing to compute
            return pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("logits", np.zeros((1, 1, self.vocab), np.float32))])
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        if ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [1, seq] with seq >= 1 (one sequence per request), got "
                             f"{list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise ValueError(f"input_ids must lie in [0, {self.vocab}), got values in [{ids.min()}, {ids.max()}]")
        now = time.monotonic()
        if start:
            state = {name: np.zeros(shape, self.dtypes[name]) for name, shape in self.empty.items()}
        else:
            entry = self.states.get(corr)
            if entry is None:
                raise ValueError(f"sequence {corr} has no state on the server: its first request must set "
                                 f"sequence_start, and it must not stay idle longer than {self.idle_s:.0f} s")
            state = entry[0]
        res = self.session.run(["logits"] + [out for _, out in self.pairs], {"input_ids": ids, **state})
        logits = res[0]
        self.states.pop(corr, None)
        if not end:
            self.states[corr] = ({name: r for (name, _), r in zip(self.pairs, res[1:])}, now)
        self._evict(now)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("logits", logits)])

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                responses.append(self._step(r))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.name}: {str(e).splitlines()[0]}")))
        return responses

    def finalize(self):
        self.states.clear()
        self.session = None
