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


def graph_buffers(x: torch.Tensor, out: torch.Tensor) -> tuple:
    """A CUDA graph's static input (a copy of `x`) and output, usable under every autograd mode.

    Tensors made under `torch.inference_mode()` are inference tensors, and an in-place update of
    one outside inference mode raises. A graph captured during an inference-mode call is replayed
    by later calls under `no_grad` (what diffusers uses) through `static_in.copy_(x)`, so its
    buffers are made as normal tensors, which accept in-place updates in every mode.
    """
    with torch.inference_mode(False):
        static_in = aligned_empty(x.shape, x.dtype, x.device)
        static_in.copy_(x)
        static_out = aligned_empty(out.shape, out.dtype, out.device)
    return static_in, static_out
