"""Engine builds for the exported ONNX: TensorRT (`build.tensorrt`).

Importing this package imports neither tensorrt nor any CUDA binding; they load when a build or a
runner starts.
"""
