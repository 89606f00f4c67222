"""Precisions and their tensor types, in one table. The type lives in the ONNX graph itself:
TensorRT 11 builds what the graph says.

Torch-free at import, so the CLI's option checks stay fast; `torch_dtype` imports it on use.
"""
from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16")
# The manifest's `io_dtype` names, per precision.
DTYPE_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Every backend's name for each tensor dtype, keyed by the manifest's (numpy's) name: the one dtype table.
# onnx: TensorProto enum values; tensorrt: trt.DataType member names; triton: model-config TYPE_ names.
DTYPES = {
    "float32": {"onnx": 1, "tensorrt": "FLOAT", "triton": "TYPE_FP32"},
    "float16": {"onnx": 10, "tensorrt": "HALF", "triton": "TYPE_FP16"},
    "bfloat16": {"onnx": 16, "tensorrt": "BF16", "triton": "TYPE_BF16"},
    "uint8": {"onnx": 2, "tensorrt": "UINT8", "triton": "TYPE_UINT8"},
}


# bfloat16 Conv, InstanceNormalization and Resize are only typed in ai.onnx opset 22.
OPSET = {"fp32": 18, "fp16": 18, "bf16": 22}


def torch_dtype(name: str):
    """torch dtype of a precision ("fp16") or of a manifest dtype name ("float16")."""
    import torch

    name = DTYPE_NAME.get(name, name)
    if name not in DTYPE_NAME.values():
        raise ValueError(f"unknown precision or dtype {name!r}: expected one of {', '.join(PRECISIONS)} "
                         f"or {', '.join(DTYPE_NAME.values())}")
    return getattr(torch, name)
