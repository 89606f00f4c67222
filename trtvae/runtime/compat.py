"""The few `torch.nn.Module` habits diffusers pipelines rely on when they hold a VAE.

A runtime is not a Module: its weights live in an ONNX file or an engine. Pipelines still call
`get_module_execution_device(vae)` (which walks `vae.modules()`), and the fp32-upcast path reads
`next(vae.post_quant_conv.parameters()).dtype`. These give them answers that are true of the
export (its dtype and device) without pretending to hold weights.
"""
from __future__ import annotations

from typing import Iterator

import torch


class _DtypeProbe:
    """Stands in for `post_quant_conv`: one empty tensor whose dtype/device are the runtime's."""

    def __init__(self, owner):
        self._owner = owner

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(0, dtype=self._owner.dtype, device=self._owner.device)

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        yield self.weight

    def __repr__(self) -> str:
        return f"<post_quant_conv of {type(self._owner).__name__}: inside the exported decoder graph>"


class ModuleHabitsMixin:
    @property
    def post_quant_conv(self) -> _DtypeProbe:
        return _DtypeProbe(self)

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        # Code that infers a model's dtype/device from its first parameter gets the export's.
        yield self.post_quant_conv.weight

    def modules(self) -> Iterator[object]:
        # diffusers looks for accelerate/group-offload hooks here; a runtime never has any.
        yield self

    def eval(self):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self
