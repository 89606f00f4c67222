"""The two traced graphs as modules: exactly what diffusers runs for encode and decode, minus sampling."""
from __future__ import annotations

import copy

import torch
from diffusers import AutoencoderKL

from ..components import DECODER, ENCODER


class DecoderGraph(torch.nn.Module):
    """post_quant_conv + decoder: latent_sample [B, C, h, w] → sample [B, 3, f·h, f·w]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv if vae.post_quant_conv is not None else torch.nn.Identity()
        self.decoder = vae.decoder

    def forward(self, latent_sample):
        return self.decoder(self.post_quant_conv(latent_sample))


class EncoderGraph(torch.nn.Module):
    """encoder + quant_conv: sample [B, 3, H, W] → latent_parameters [B, 2C, H/f, W/f] (mean, logvar).

    Sampling stays outside: the runtime wraps the parameters in diffusers'
    DiagonalGaussianDistribution, so results are reproducible with a generator.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv if vae.quant_conv is not None else torch.nn.Identity()

    def forward(self, sample):
        return self.quant_conv(self.encoder(sample))


_GRAPHS = {DECODER: DecoderGraph, ENCODER: EncoderGraph}


def component_module(vae: AutoencoderKL, component: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of one component in `dtype`, leaving the fp32 model intact as the reference."""
    graph = _GRAPHS[component](vae)
    # Seed deepcopy's memo with already-cast tensors, so no full-precision copy is ever made.
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in graph.parameters()}
    memo.update({id(b): b.detach().to(dtype) if b.is_floating_point() else b.clone() for b in graph.buffers()})
    return copy.deepcopy(graph, memo).eval().requires_grad_(False)
