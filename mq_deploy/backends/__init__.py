"""Runtimes behind one Runner protocol (`base`): ONNX Runtime (`ort`) and TensorRT (`trt`).

Backends import onnx, onnxruntime and Polygraphy (which loads TensorRT lazily); never torch. The
PyTorch reference runner lives in mq_deploy.verify.torch_runner.
"""
