"""A planted fp16 overflow for the tests and benchmarks/fp16_planted.py: one residual stream per component, scaled up.

The layers are named here, never taken from the package's rescaling plan, so "the audit flags the
planted layers" and "the rescaling can undo them" are claims the tests check, not consequences of one
table. Each planted stretch of the residual stream, through a mid-block, has no other way in or out:

- decoder: conv_in → the mid-block (ResNets and attention) → up_blocks[0]'s ResNets → its upsampler's conv;
- encoder: the conv that starts the last down block's stream (its first ResNet's conv_shortcut where
  the width changes, else the downsampler before it) → that block's ResNets → the mid-block → conv_norm_out.

Everything writing to the stream (the first conv, each ResNet's conv2, the attention's output
projection) is multiplied by 2^k, everything normalizing it (norm1, group_norm, conv_norm_out) gets
eps × 4^k, and a conv reading it at the end gets its weight × 2^-k. Powers of two multiply exactly,
so the fp32 model is bit-identical, while the stream's residual sums, which fp16 graphs hold in fp16
(ONNX Runtime's CPU Adds around attention included), grow 2^k-fold past 65504. The names exist in
every AutoencoderKL with two or more levels (the tiny test VAEs, SDXL, FLUX.1).

A saved copy keeps the scaled weights but not the scaled eps (eps is no tensor): its fp32 outputs
differ from the original's by about 1e-6, and its fp16 overflows all the same.
"""
from __future__ import annotations

import copy

import torch


def streams(vae) -> dict:
    """component → (convs starting the stream, [ResNets and attention blocks on it], norms ending it, conv reading it)."""
    up0 = [f"decoder.up_blocks.0.resnets.{j}" for j in range(len(vae.decoder.up_blocks[0].resnets))]
    last = len(vae.encoder.down_blocks) - 1
    down = [f"encoder.down_blocks.{last}.resnets.{j}" for j in range(len(vae.encoder.down_blocks[last].resnets))]
    if vae.encoder.down_blocks[last].resnets[0].conv_shortcut is not None:
        start = [f"{down[0]}.conv_shortcut"]  # with its conv2 (below) it writes the new stream; its norm1 reads the old
    else:
        start = [f"encoder.down_blocks.{last - 1}.downsamplers.0.conv"]
    mid = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    return {"decoder": (["decoder.conv_in"], [f"decoder.{m}" for m in mid] + up0, [],
                        "decoder.up_blocks.0.upsamplers.0.conv"),
            "encoder": (start, down + [f"encoder.{m}" for m in mid], ["encoder.conv_norm_out"], None)}


def plant_exponents(lowest: int) -> dict:
    """component → k: the decoder's stream × 2^lowest, the encoder's × 2^(lowest+1)."""
    return {"decoder": lowest, "encoder": lowest + 1}


@torch.no_grad()
def plant_overflow(vae, lowest: int, components=("decoder", "encoder")):
    """A copy of `vae` whose planted streams are 2^k times larger; its fp32 outputs are unchanged."""
    planted = copy.deepcopy(vae)
    modules = dict(planted.named_modules())
    for component in components:
        start, blocks, norms, reader = streams(planted)[component]
        f = 2.0 ** plant_exponents(lowest)[component]
        for name in start:
            _scale(modules[name], f)
        for name in blocks:
            block = modules[name]
            if name.split(".")[-2] == "attentions":
                block.group_norm.eps *= f * f
                _scale(block.to_out[0], f)
                continue
            if f"{name}.conv_shortcut" not in start:
                assert block.conv_shortcut is None, f"{name} has a conv_shortcut: the stream would leave here"
                block.norm1.eps *= f * f
            _scale(block.conv2, f)
        for name in norms:
            modules[name].eps *= f * f
        if reader is not None:
            modules[reader].weight.mul_(1 / f)
    return planted


def _scale(layer, f: float) -> None:
    layer.weight.mul_(f)
    layer.bias.mul_(f)


def planted_factor(vae, layer: str, lowest: int, components=("decoder", "encoder")) -> float:
    """How much the audited output of `layer` grew in the planted model: 2^k on the stream, else 1."""
    for component in components:
        start, blocks, _, _ = streams(vae)[component]
        writers = [*start, *blocks, *(f"{b}.to_out.0" if ".attentions." in b else f"{b}.conv2" for b in blocks)]
        if layer in writers:
            return 2.0 ** plant_exponents(lowest)[component]
    return 1.0
