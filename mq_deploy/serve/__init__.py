"""Serving: Triton Inference Server model repositories (`repository`), the Python-backend models they
hold (`triton_models/`), and a tritonserver launcher (`server`). Nothing heavy is imported here."""
