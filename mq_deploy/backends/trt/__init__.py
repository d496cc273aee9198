"""TensorRT through Polygraphy: engine build (`build`), runner (`runner`), plugin loading (`plugins`).

Importing this package imports neither tensorrt nor a CUDA binding; Polygraphy imports TensorRT
lazily, when a loader or runner is first called.
"""
