"""A planted fp16 overflow for the tests and benchmarks/fp16_planted.py: one residual stream per component, scaled up.

The layers are named here, never taken from the package's rescaling plan, so "the audit flags the
planted layers" and "the rescaling can undo them" are claims the tests check, not consequences of one
table. Each planted stretch of the residual stream runs from a conv that starts it to the conv that
ends it, with no other way in or out:

- decoder: conv_in → the mid-block (ResNets and attention) → up_blocks[0]'s ResNets → its upsampler's conv;
- encoder: conv_in → down_blocks[0]'s ResNets → its downsampler's conv.

Everything writing to the stream (the first conv, each ResNet's conv2, the attention's output
projection) is multiplied by 2^k, everything normalizing it (norm1, the attention's group_norm) gets
eps × 4^k, and the conv reading it at the end gets its weight × 2^-k. Powers of two multiply exactly,
so the fp32 model is bit-identical, while the stream's residual sums, which fp16 graphs hold in fp16
(ONNX Runtime's CPU Add included), grow 2^k-fold past 65504. The names exist in every AutoencoderKL
with two or more levels whose first block keeps its width (the tiny test VAEs, SDXL, FLUX.1).

A saved copy keeps the scaled weights but not the scaled eps (eps is no tensor): its fp32 outputs
differ from the original's by about 1e-6, and its fp16 overflows all the same.
"""
from __future__ import annotations

import copy

import torch


def streams(vae) -> dict:
    """component → (the conv starting the stream, [ResNets and attention blocks on it], the conv ending it)."""
    up0 = [f"decoder.up_blocks.0.resnets.{j}" for j in range(len(vae.decoder.up_blocks[0].resnets))]
    down0 = [f"encoder.down_blocks.0.resnets.{j}" for j in range(len(vae.encoder.down_blocks[0].resnets))]
    mid = ["decoder.mid_block.resnets.0", "decoder.mid_block.attentions.0", "decoder.mid_block.resnets.1"]
    return {"decoder": ("decoder.conv_in", mid + up0, "decoder.up_blocks.0.upsamplers.0.conv"),
            "encoder": ("encoder.conv_in", down0, "encoder.down_blocks.0.downsamplers.0.conv")}


def plant_exponents(lowest: int) -> dict:
    """component → k: the decoder's stream × 2^lowest, the encoder's × 2^(lowest+1)."""
    return {"decoder": lowest, "encoder": lowest + 1}


@torch.no_grad()
def plant_overflow(vae, lowest: int, components=("decoder", "encoder")):
    """A copy of `vae` whose planted streams are 2^k times larger; its fp32 outputs are unchanged."""
    planted = copy.deepcopy(vae)
    modules = dict(planted.named_modules())
    for component in components:
        start, blocks, end = streams(planted)[component]
        f = 2.0 ** plant_exponents(lowest)[component]
        _scale(modules[start], f)
        for name in blocks:
            block = modules[name]
            if name.split(".")[-2] == "attentions":
                block.group_norm.eps *= f * f
                _scale(block.to_out[0], f)
            else:
                assert block.conv_shortcut is None, f"{name} has a conv_shortcut: the stream would leave here"
                block.norm1.eps *= f * f
                _scale(block.conv2, f)
        modules[end].weight.mul_(1 / f)
    return planted


def _scale(layer, f: float) -> None:
    layer.weight.mul_(f)
    layer.bias.mul_(f)


def planted_factor(vae, layer: str, lowest: int, components=("decoder", "encoder")) -> float:
    """How much the audited output of `layer` grew in the planted model: 2^k on the stream, else 1."""
    for component in components:
        start, blocks, _ = streams(vae)[component]
        writers = [start, *blocks, *(f"{b}.to_out.0" if ".attentions." in b else f"{b}.conv2" for b in blocks)]
        if layer in writers:
            return 2.0 ** plant_exponents(lowest)[component]
    return 1.0
