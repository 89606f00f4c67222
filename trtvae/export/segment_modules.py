"""The decoder and encoder cut at every GroupNorm, as small modules over the model's own weights.

Each tiled segment starts at a GroupNorm input and runs up to the next one: the normalization with
statistics given from outside (`mean`, `rstd` per channel, float32), then what diffusers runs after
it (activation, convs, the residual add, a nearest upsample or a strided downsample and their conv).
No GroupNorm op remains inside, so a segment run on a window of the image computes exactly what the
whole graph computes there, as long as the window holds the segment's halo. The latent-resolution
parts (the decoder's head, the encoder's tail) hold the mid-block's global attention and run whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class GlobalNorm(nn.Module):
    """GroupNorm's affine step with statistics computed elsewhere: (x - mean) · rstd · γ + β, in float32."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        if not isinstance(norm, nn.GroupNorm) or not norm.affine:
            raise TypeError(f"exact tiling needs an affine nn.GroupNorm here, found {type(norm).__name__}")
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x, mean, rstd):
        y = (x.float() - mean[:, :, None, None]) * rstd[:, :, None, None]
        return (y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]).to(x.dtype)


class ConvIn(nn.Module):
    """The encoder's first conv: no normalization before it."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class NormActConv(nn.Module):
    """A resnet's first half (norm1 → act → conv1), or norm_out → act → conv_out."""

    def __init__(self, norm, act, conv):
        super().__init__()
        self.norm, self.act, self.conv = GlobalNorm(norm), act, conv

    def forward(self, x, mean, rstd):
        return self.conv(self.act(self.norm(x, mean, rstd)))


class ResnetTail(nn.Module):
    """A resnet's second half (norm2 → act → conv2, shortcut, add, scale) and the resampler that follows it."""

    def __init__(self, resnet, resampler=None):
        super().__init__()
        self.norm, self.act, self.conv = GlobalNorm(resnet.norm2), resnet.nonlinearity, resnet.conv2
        self.shortcut = resnet.conv_shortcut
        self.scale = float(resnet.output_scale_factor)
        self.resampler = resampler

    def forward(self, x, mean, rstd, residual):
        h = self.conv(self.act(self.norm(x, mean, rstd)))
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        out = (residual + h) / self.scale if self.scale != 1.0 else residual + h
        return self.resampler(out) if self.resampler is not None else out


class Sequence(nn.Module):
    """Modules run in order, whole (the decoder's head, the encoder's tail)."""

    def __init__(self, *modules):
        super().__init__()
        self.parts = nn.ModuleList([m for m in modules if m is not None])

    def forward(self, x):
        for part in self.parts:
            x = part(x)
        return x


@dataclass
class Segment:
    """One step of a tiled component: its module and how the runtime feeds it.

    `source`/`residual` index earlier steps (-1: the component's input); `halo` is in input pixels;
    `upscale`/`downscale` relate output to input size; `align`: window starts are multiples of it.
    """

    name: str
    module: nn.Module
    in_channels: int
    out_channels: int
    source: int
    residual: int | None = None
    norm: dict | None = None
    tiled: bool = True
    halo: int = 0
    upscale: int = 1
    downscale: int = 1
    align: int = 1
    extra: dict = field(default_factory=dict)


def _norm_info(norm: nn.GroupNorm) -> dict:
    return {"groups": int(norm.num_groups), "eps": float(norm.eps), "channels": int(norm.num_channels)}


def _check_conv3(conv, where: str, stride: int = 1) -> None:
    if tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (stride, stride):
        raise TypeError(f"exact tiling expects a 3×3 stride-{stride} conv at {where}, "
                        f"found kernel {tuple(conv.kernel_size)} stride {tuple(conv.stride)}")


def _resnet_segments(resnet, name: str, resampler, kind: str, steps: list) -> None:
    """Append a resnet's two segments; the second carries the block's resampler (kind 'up'/'down'/None)."""
    _check_conv3(resnet.conv1, f"{name}.conv1")
    _check_conv3(resnet.conv2, f"{name}.conv2")
    if getattr(resnet, "upsample", None) is not None or getattr(resnet, "downsample", None) is not None or \
            resnet.time_emb_proj is not None:
        raise TypeError(f"exact tiling expects a plain ResnetBlock2D at {name}")
    source = len(steps) - 1
    steps.append(Segment(f"{name}.a", NormActConv(resnet.norm1, resnet.nonlinearity, resnet.conv1),
                         resnet.in_channels, resnet.conv1.out_channels, source=source,
                         norm=_norm_info(resnet.norm1), halo=1))
    seg = Segment(f"{name}.b", ResnetTail(resnet, resampler), resnet.conv1.out_channels,
                  resnet.conv2.out_channels, source=len(steps) - 1, residual=source,
                  norm=_norm_info(resnet.norm2), halo=1)
    if kind == "up":  # conv2, then nearest ×2 and a 3×3 conv: one more input pixel either side
        _check_conv3(resampler.conv, f"{name} upsampler")
        seg.halo, seg.upscale = 2, 2
    elif kind == "down":  # pad (0,1,0,1) + 3×3 stride 2: windows on even pixels, one more on the far side
        _check_conv3(resampler.conv, f"{name} downsampler", stride=2)
        if resampler.padding != 0:
            raise TypeError(f"exact tiling expects diffusers' pad-(0,1,0,1) downsampler at {name}")
        seg.halo, seg.downscale, seg.align = 2, 2, 2
    steps.append(seg)


def _resampler(block, attr: str):
    found = getattr(block, attr, None)
    if not found:
        return None
    if len(found) != 1:
        raise TypeError(f"exact tiling expects one {attr[:-1]} per block, found {len(found)}")
    return found[0]


def decoder_segments(vae) -> list:
    """The decoder as steps: the head (post_quant_conv, conv_in, mid-block) whole, the up path in segments."""
    dec = vae.decoder
    if getattr(dec, "conv_norm_out", None) is None or not isinstance(dec.conv_norm_out, nn.GroupNorm):
        raise TypeError("exact tiling needs a decoder ending in a GroupNorm (spatial norm decoders are not supported)")
    head_in = getattr(vae, "post_quant_conv", None)
    mid_channels = dec.conv_in.out_channels
    steps = [Segment("head", Sequence(head_in, dec.conv_in, _MidBlock(dec.mid_block)),
                     dec.conv_in.in_channels, mid_channels, source=-1, tiled=False)]
    for b, block in enumerate(dec.up_blocks):
        up = _resampler(block, "upsamplers")
        for r, resnet in enumerate(block.resnets):
            last = r == len(block.resnets) - 1
            _resnet_segments(resnet, f"up_blocks.{b}.resnets.{r}", up if last else None,
                             "up" if last and up is not None else None, steps)
    _check_conv3(dec.conv_out, "decoder.conv_out")
    steps.append(Segment("norm_out", NormActConv(dec.conv_norm_out, dec.conv_act, dec.conv_out),
                         dec.conv_out.in_channels, dec.conv_out.out_channels, source=len(steps) - 1,
                         norm=_norm_info(dec.conv_norm_out), halo=1))
    return steps


def encoder_segments(vae) -> list:
    """The encoder as steps: conv_in and the down path in segments, the tail (mid-block onwards) whole."""
    enc = vae.encoder
    _check_conv3(enc.conv_in, "encoder.conv_in")
    steps = [Segment("conv_in", ConvIn(enc.conv_in), enc.conv_in.in_channels, enc.conv_in.out_channels,
                     source=-1, halo=1)]
    for b, block in enumerate(enc.down_blocks):
        down = _resampler(block, "downsamplers")
        for r, resnet in enumerate(block.resnets):
            last = r == len(block.resnets) - 1
            _resnet_segments(resnet, f"down_blocks.{b}.resnets.{r}", down if last else None,
                             "down" if last and down is not None else None, steps)
    tail = Sequence(_MidBlock(enc.mid_block), enc.conv_norm_out, enc.conv_act, enc.conv_out,
                    getattr(vae, "quant_conv", None))
    out_channels = vae.quant_conv.out_channels if getattr(vae, "quant_conv", None) is not None \
        else enc.conv_out.out_channels
    steps.append(Segment("tail", tail, steps[-1].out_channels, out_channels, source=len(steps) - 1, tiled=False))
    return steps


class _MidBlock(nn.Module):
    """diffusers' mid-block without the optional temb argument, so it can sit in a Sequence."""

    def __init__(self, mid):
        super().__init__()
        self.mid = mid

    def forward(self, x):
        return self.mid(x)
