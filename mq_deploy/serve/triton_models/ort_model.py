"""Triton Python-backend model written by `mq-deploy triton --backend python`: an mq-deploy ONNX graph
(Vim classifier or full-sequence LM) run in ONNX Runtime on the CPU, with the session options of
mq_deploy's OrtRunner, so a served request returns exactly what `mq-deploy run` computes.

Parameters (config.pbtxt): onnx_file, intra_op_threads (0: ONNX Runtime's default), and optionally
custom_op_library (the native mq::SelectiveScan library, a file in this folder).
Dynamic batching: the requests of one execute() call whose input shapes agree past the batch
dimension run as one batch; the outputs are split back per request.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # mq_ort_session.py is copied beside us
from mq_ort_session import make_session, parameters  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        self.session = make_session(model_dir, parameters(self.config), self.name)
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]
        self.batching = int(self.config.get("max_batch_size", 0)) > 0

    def _run(self, feeds):
        return self.session.run(self.output_names, feeds)

    def execute(self, requests):
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names} for r in requests]
        groups = {}
        for i, f in enumerate(feeds):
            key = tuple((n, f[n].dtype.str, f[n].shape[1:] if self.batching else f[n].shape) for n in self.input_names)
            groups.setdefault(key if self.batching else i, []).append(i)
        responses = [None] * len(requests)
        for idx in groups.values():
            if len(idx) == 1:
                batch = feeds[idx[0]]
            else:
                batch = {n: np.concatenate([feeds[i][n] for i in idx]) for n in self.input_names}
            try:
                outs = self._run(batch)
            except Exception as e:   # ONNX Runtime's message names the input and the problem
                err = pb_utils.TritonError(f"{self.name}: {str(e).splitlines()[0]}")
                for i in idx:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                continue
            start = 0
            for i in idx:
                n = feeds[i][self.input_names[0]].shape[0]
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(o[start:start + n]) if len(idx) > 1 else o)
                           for name, o in zip(self.output_names, outs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += n
        return responses

    def finalize(self):
        self.session = None
