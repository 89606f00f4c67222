"""Tensors handed to TensorRT by address: the rules they must meet. Pure torch, testable on the CPU.

TensorRT requires every I/O address to be 256-byte aligned (`NvInferRuntime.h`, `setTensorAddress`).
A fresh CUDA allocation from torch's caching allocator starts a block and meets it; an offset view
does not: `x.split(1)` under slicing and `x[start:start + n]` batch chunks start inside their base
(image 1 of a 100×100 fp16 latent batch starts at byte 80000, which is 80000 % 256 = 128).
"""
from __future__ import annotations

import torch

ALIGNMENT = 256  # bytes, TensorRT's I/O address rule


def is_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGNMENT == 0


def aligned_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized contiguous tensor whose first byte is 256-byte aligned, on any allocator.

    Over-allocates by one alignment and starts at the first aligned byte, so the rule holds where the
    allocator guarantees less (the CPU one aligns to 64), not only where a fresh CUDA block happens to.
    """
    shape = tuple(shape)
    numel = 1
    for n in shape:
        numel *= n
    size = torch.empty((), dtype=dtype).element_size()
    base = torch.empty(numel + ALIGNMENT // size, dtype=dtype, device=device)
    skip = (-base.data_ptr() % ALIGNMENT) // size  # allocators align to at least the element size
    return base[skip:skip + numel].view(shape)


def aligned(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when TensorRT may read it in place, else an aligned contiguous copy."""
    if x.is_contiguous() and is_aligned(x):
        return x
    return aligned_empty(x.shape, x.dtype, x.device).copy_(x)
