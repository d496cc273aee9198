"""Triton Python-backend model written by `mq-deploy triton` for a Vim: encoded image bytes (PNG, JPEG,
... anything Pillow reads) -> the normalised float tensor the classifier takes, exactly as `mq-deploy run`
prepares it. The transform is mq_deploy/data/picture.py itself: `mq-deploy triton` copies that file beside
this one as mq_picture.py (the server's Python needs numpy and Pillow, not mq_deploy).

Input: image BYTES [1] per request (batched). Output: images FP32 [C, H, W] per request.
Pillow is imported on the first request, so a server without it still loads the other models and
this one answers with an error that names the fix.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # mq_picture.py is copied beside us
import mq_picture  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        p = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.chans, self.size = int(p["in_chans"]), int(p["img_size"])
        self.mean, self.std = json.loads(p["image_mean"]), json.loads(p["image_std"])
        mq_picture.transform_for(self.size)     # a bad size fails loading, not every request

    def _decode(self, raw):
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ValueError("the server's Python cannot import PIL; install Pillow for it "
                             "(`mq-deploy serve --setup`; Debian: apt-get install python3-pil)") from None
        return mq_picture.decode(bytes(raw), self.chans, self.size)

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                raws = pb_utils.get_input_tensor_by_name(r, "image").as_numpy().reshape(-1)
                x = mq_picture.normalize(np.stack([self._decode(b) for b in raws]), self.mean, self.std)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", x)]))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.name}: {str(e).splitlines()[0]}")))
        return responses
