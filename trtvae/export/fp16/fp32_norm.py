"""`--fp32-norm`: GroupNorm statistics in fp32 inside an otherwise fp16 graph.

TensorRT 11 has no per-layer precision setting any more; the type of a normalization is
the type of its input tensor. So the graph itself says it: Cast(fp32) → Reshape →
InstanceNormalization (fp32) → Reshape → Cast(fp16), then the affine weight and bias
in fp16. The weights stay fp16 initializers; the only fp32 initializers are the
InstanceNormalization's own unit scale and zero bias, which ONNX requires to have its
input's type (check_graph allows exactly those).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fp32StatsGroupNorm(nn.GroupNorm):
    """A GroupNorm that normalizes in fp32 and applies its affine in the input's type."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # instance_norm over (B, groups, rest) rather than group_norm(weight=None): the exporter's
        # group_norm adds fp32 Mul/Add by constant ones and zeros, which would be fp32 weights.
        groups = x.float().reshape(x.shape[0], self.num_groups, -1)
        y = F.instance_norm(groups, eps=self.eps).reshape(x.shape).to(x.dtype)
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


def keep_norms_fp32(module: nn.Module) -> int:
    """Switch every GroupNorm of `module` (an export copy) in place; return how many."""
    count = 0
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = Fp32StatsGroupNorm
            count += 1
    return count
