"""Triton Python-backend model sources. `mq-deploy triton --backend python` copies them into a model
repository as NAME/1/model.py; they run inside tritonserver's Python stub (numpy, onnxruntime,
triton_python_backend_utils), never imported by mq_deploy itself, except mq_batch.py (numpy only: how
states stack into a batch), which the in-process batched generate shares with the served step model."""
