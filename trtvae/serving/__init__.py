"""Serving an export behind NVIDIA Triton Inference Server.

`models.py` declares the served models and runs them on a runtime (OrtVae/TRTVae); `python_backend.py`
is that code as Triton's Python backend; `repository.py` writes model repositories (native ONNX/TensorRT,
or the Python backend); `server.py` runs the `tritonserver` that the `triton` extra (nvidia-pytriton)
bundles. Uses the runtime, never the exporter.
"""
