"""ONNX Runtime: the session runner (`runner`) and the ORT-optimized model build (`build`)."""
