"""Triton Python-backend model written by `mq-deploy triton` for a Vim: encoded image bytes (PNG, JPEG,
... anything Pillow reads) -> the normalised float tensor the classifier takes, as `mq-deploy run`
prepares it: grey or RGB as the model's channels, bilinear resize to img_size, /255, (x - mean) / std.

Input: image BYTES [1] per request (batched). Output: images FP32 [C, H, W] per request.
Pillow is imported on the first request, so a server without it still loads the other models and
this one answers with an error that names the fix.
"""

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        p = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.chans, self.size = int(p["in_chans"]), int(p["img_size"])
        self.mean = np.asarray(json.loads(p["image_mean"]), np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(json.loads(p["image_std"]), np.float32).reshape(-1, 1, 1)
        self.batching = int(self.config.get("max_batch_size", 0)) > 0

    def _decode(self, raw):
        try:
            from PIL import Image
        except ImportError:
            raise ValueError("the server's Python cannot import PIL; install Pillow for it "
                             "(Debian: apt-get install python3-pil)") from None
        try:
            with Image.open(io.BytesIO(bytes(raw))) as im:
                im = im.convert("L" if self.chans == 1 else "RGB")
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise ValueError(f"cannot decode the image ({e})") from None
        a = a[None] if self.chans == 1 else a.transpose(2, 0, 1)
        return (a.astype(np.float32) / np.float32(255.0) - self.mean) / self.std

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                raws = pb_utils.get_input_tensor_by_name(r, "image").as_numpy().reshape(-1)
                x = np.stack([self._decode(b) for b in raws]).astype(np.float32)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", x)]))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.name}: {str(e).splitlines()[0]}")))
        return responses
