"""The traced graphs as modules: exactly what diffusers runs for encode and decode, minus sampling.

Which submodules make up each graph is declared once, in `components.py`. The encoder graph ends
at the mean and logvar: sampling stays outside, so the runtime's DiagonalGaussianDistribution is
reproducible with a generator.
"""
from __future__ import annotations

import copy

import torch

from ..components import ComponentSpec, component_specs


class ComponentGraph(torch.nn.Module):
    """The spec's AutoencoderKL submodules, run in order, under their own names (post_quant_conv, decoder...)."""

    def __init__(self, vae, spec: ComponentSpec):
        super().__init__()
        self.order = []
        for name in spec.modules:
            module = getattr(vae, name, None)
            if module is not None:  # SD3/FLUX have no quant convs
                self.add_module(name, module)
                self.order.append(name)

    def forward(self, x):
        for name in self.order:
            x = getattr(self, name)(x)
        return x


def component_graph(vae, component: str) -> ComponentGraph:
    """The graph of one component, sharing `vae`'s weights."""
    return ComponentGraph(vae, component_specs(vae.config)[component])


def component_module(vae, component: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of one component in `dtype`, leaving the fp32 model intact as the reference."""
    graph = component_graph(vae, component)
    # Seed deepcopy's memo with already-cast tensors, so no full-precision copy is ever made.
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in graph.parameters()}
    memo.update({id(b): b.detach().to(dtype) if b.is_floating_point() else b.clone() for b in graph.buffers()})
    return copy.deepcopy(graph, memo).eval().requires_grad_(False)
