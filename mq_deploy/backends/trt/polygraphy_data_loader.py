"""Data loader for NVIDIA's own `polygraphy run --data-loader-script` on an mq-deploy export, so a
TensorRT engine can be checked against ONNX Runtime with Polygraphy alone (docs/tensorrt.md):

    MQ_ONNX=model.onnx MQ_SHAPES=input_ids:2x64 polygraphy run model.onnx --onnxrt \\
        --data-loader-script $(python -m mq_deploy.backends.trt.polygraphy_data_loader) --save-outputs ort.json

Environment: MQ_ONNX (required: the exported model, for its inputs and metadata), MQ_SHAPES
(trtexec syntax; dynamic dims default to batch 2, length 64), MQ_ITERATIONS (default 2), MQ_SEED
(default 0). Each iteration draws fresh feeds: token ids in the vocabulary, zero states, standard
normal images. Needs numpy and onnx (both come with Polygraphy's ONNX Runtime runner); no torch.
"""

from __future__ import annotations

import os
import sys


def load_data():
    from mq_deploy.backends.base import TensorSpec
    from mq_deploy.backends.feeds import sample_feeds
    from mq_deploy.backends.trt.build import parse_shapes
    from mq_deploy.export.onnx_file import graph_inputs, load_onnx, metadata

    path = os.environ.get("MQ_ONNX")
    if not path:
        raise SystemExit("mq-deploy data loader: set MQ_ONNX to the exported model.onnx")
    import onnx

    model = load_onnx(path, load_external_data=False)
    specs = {n: TensorSpec(n, onnx.helper.tensor_dtype_to_np_dtype(t), s) for n, t, s in graph_inputs(model)}
    shapes = parse_shapes(os.environ.get("MQ_SHAPES"))
    seed = int(os.environ.get("MQ_SEED", "0"))
    for i in range(int(os.environ.get("MQ_ITERATIONS", "2"))):
        yield sample_feeds(specs, metadata(model), shapes, seed + i, what=path)


if __name__ == "__main__":     # print this file's path, for --data-loader-script
    sys.stdout.write(os.path.abspath(__file__) + "\n")
