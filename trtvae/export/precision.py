"""Precision choices. The type lives in the ONNX graph itself: TensorRT 11 builds what the graph says."""
from __future__ import annotations

import torch

TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPE_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# bfloat16 Conv, InstanceNormalization and Resize are only typed in ai.onnx opset 22.
OPSET = {"fp32": 18, "fp16": 18, "bf16": 22}
PRECISIONS = tuple(TORCH_DTYPE)
