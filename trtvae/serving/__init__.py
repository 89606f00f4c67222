"""Serving an export behind NVIDIA Triton Inference Server.

`models.py` declares the served models and runs them on a runtime (OrtVae/TRTVae); `python_backend.py`
is that code as Triton's Python backend (load and warm-up in `initialize`, per-request errors);
`repository.py` writes model repositories (native ONNX/TensorRT, or the Python backend) as Triton's
own `ModelConfig` protobuf; `triton_process.py` runs the `tritonserver` that the `triton` extra
(nvidia-pytriton) bundles and talks to it through `tritonclient`; `server.py` is `vae-export serve`.
Uses the runtime, never the exporter.
"""
