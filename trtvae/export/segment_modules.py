"""The decoder and encoder cut at every GroupNorm, as small modules over the model's own weights.

Each tiled segment starts at a GroupNorm input and runs up to the next one: the normalization with
statistics given from outside (`mean`, `rstd` per channel, float32), then what diffusers runs after
it (activation, convs, the residual add, a nearest upsample or a strided downsample and their conv).
No GroupNorm op remains inside, so a segment run on a window of the image computes exactly what the
whole graph computes there, as long as the window holds the segment's halo. Activations between
segments travel in float32 whatever the model's precision: weights and convs stay in the model's
type, but the residual stream is not rounded to fp16 at every cut (measured on ONNX Runtime CPU:
rounding there put exact fp16 3.6 dB further from fp32 than the untiled fp16 graph).
The mid-block's global attention is cut in two: per-pixel q, k, v projections (tiled like the rest)
and the attention of query rows against every key and value (exact in row chunks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, with no op traced where it already is: an fp32 export then holds no no-op Casts (each one
    a full pass over a window on ONNX Runtime's CPU provider, which keeps those that feed a graph output)."""
    return t if t.dtype == dtype else t.to(dtype)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return _as(t, torch.float32)


class GlobalNorm(nn.Module):
    """GroupNorm's affine step with statistics computed elsewhere: (x - mean) · (rstd · γ) + β, in float32.

    The result stays float32 through the activation that follows; it is rounded to the model's type
    once, before the conv (fewer roundings than the whole fp16 graph, never more).
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        if not isinstance(norm, nn.GroupNorm) or not norm.affine:
            raise TypeError(f"exact tiling needs an affine nn.GroupNorm here, found {type(norm).__name__}")
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x, mean, rstd):
        # γ folded into rstd on [B, C]: two passes over the window instead of four.
        scale = rstd * _f32(self.weight)[None, :]
        return (_f32(x) - mean[:, :, None, None]) * scale[:, :, None, None] + _f32(self.bias)[None, :, None, None]


class ConvIn(nn.Module):
    """The encoder's first conv: no normalization before it."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return _f32(self.conv(_as(x, self.conv.weight.dtype)))


class NormActConv(nn.Module):
    """A resnet's first half (norm1 → act → conv1), or norm_out → act → conv_out."""

    def __init__(self, norm, act, conv):
        super().__init__()
        self.norm, self.act, self.conv = GlobalNorm(norm), act, conv

    def forward(self, x, mean, rstd):
        return _f32(self.conv(_as(self.act(self.norm(x, mean, rstd)), self.conv.weight.dtype)))


class ResnetTail(nn.Module):
    """A resnet's second half (norm2 → act → conv2, shortcut, add, scale) and the resampler that follows it."""

    def __init__(self, resnet, resampler=None):
        super().__init__()
        self.norm, self.act, self.conv = GlobalNorm(resnet.norm2), resnet.nonlinearity, resnet.conv2
        self.shortcut = resnet.conv_shortcut
        self.scale = float(resnet.output_scale_factor)
        self.resampler = resampler

    def forward(self, x, mean, rstd, residual):
        dtype = self.conv.weight.dtype
        h = _f32(self.conv(_as(self.act(self.norm(x, mean, rstd)), dtype)))
        if self.shortcut is not None:
            residual = self.shortcut(_as(residual, dtype))
        out = (_f32(residual) + h) / self.scale if self.scale != 1.0 else _f32(residual) + h
        return _f32(self.resampler(_as(out, dtype))) if self.resampler is not None else out


class AttentionQKV(nn.Module):
    """The mid-block attention's group norm and q, k, v projections: per pixel, so tiled without a halo."""

    def __init__(self, attn):
        super().__init__()
        self.norm, self.to_q, self.to_k, self.to_v = GlobalNorm(attn.group_norm), attn.to_q, attn.to_k, attn.to_v

    def forward(self, x, mean, rstd):
        b, c, h, w = x.shape
        n = _as(self.norm(x, mean, rstd), self.to_q.weight.dtype).reshape(b, c, h * w).transpose(1, 2)
        qkv = torch.cat([self.to_q(n), self.to_k(n), self.to_v(n)], dim=2)
        return _f32(qkv.transpose(1, 2).reshape(b, 3 * c, h, w))


class AttentionRows(nn.Module):
    """Attention of some query rows against every key and value, the output projection and the residual.

    Softmax rows are independent, so running the queries in row chunks is exact; the scores held at
    once are (rows · width) × (height · width) instead of the whole square.
    """

    def __init__(self, attn):
        super().__init__()
        if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise TypeError("exact tiling supports the VAE mid-block's plain attention only")
        self.heads, self.to_out = attn.heads, attn.to_out[0]
        self.residual_connection, self.rescale = attn.residual_connection, float(attn.rescale_output_factor)

    def forward(self, x, kv, residual):
        b, c, h, w = x.shape
        d = c // self.heads
        # The scale goes on the queries, not the (rows · w) × (h · w) scores: one pass less over the largest tensor.
        q = _f32(x.reshape(b, self.heads, d, h * w).transpose(2, 3)) * (d ** -0.5)
        k, v = kv[:, :c].reshape(b, self.heads, d, -1), kv[:, c:].reshape(b, self.heads, d, -1)
        # Scores and softmax in float32: a sum over every key.
        scores = torch.softmax(torch.matmul(q, _f32(k)), dim=-1)
        out = torch.matmul(scores, _f32(v).transpose(2, 3)).transpose(1, 2).reshape(b, h * w, c)
        out = _f32(self.to_out(_as(out, self.to_out.weight.dtype))).transpose(1, 2).reshape(b, c, h, w)
        if self.residual_connection:
            out = out + _f32(residual)
        return out / self.rescale if self.rescale != 1.0 else out


class Sequence(nn.Module):
    """Modules run in order; the first also takes the segment's other inputs (mean, rstd)."""

    def __init__(self, *modules):
        super().__init__()
        self.parts = nn.ModuleList([m for m in modules if m is not None])

    def forward(self, x, *rest):
        dtype = next(self.parameters()).dtype
        x = self.parts[0](x if rest else _as(x, dtype), *rest)
        for part in self.parts[1:]:
            x = part(_as(x, dtype))
        return _f32(x)


@dataclass
class Segment:
    """One step of a tiled component: its module and how the runtime feeds it.

    `source`/`residual` index earlier steps (-1: the component's input); `halo` is in input pixels;
    an attention step's x is the q part of its source (a qkv step), its kv input the rest;
    `upscale`/`downscale` relate output to input size; `align`: window starts are multiples of it.
    """

    name: str
    module: nn.Module
    in_channels: int
    out_channels: int
    source: int
    residual: int | None = None
    norm: dict | None = None
    kind: str = "tiled"  # "tiled", "whole", or "attention" (query rows against all keys and values)
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


def _mid_block_segments(mid, steps: list) -> None:
    """The mid-block: resnet, (attention, resnet)*, each attention as a per-pixel qkv step and a rows step."""
    _resnet_segments(mid.resnets[0], "mid_block.resnets.0", None, None, steps)
    for i, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            source = len(steps) - 1
            channels = steps[source].out_channels
            steps.append(Segment(f"mid_block.attentions.{i}.qkv", AttentionQKV(attn), channels, 3 * channels,
                                 source=source, norm=_norm_info(attn.group_norm)))
            steps.append(Segment(f"mid_block.attentions.{i}.rows", AttentionRows(attn), channels, channels,
                                 source=len(steps) - 1, residual=source, kind="attention"))
        _resnet_segments(resnet, f"mid_block.resnets.{i + 1}", None, None, steps)


def _path_segments(blocks, kind: str, steps: list) -> None:
    """The up (kind "up") or down ("down") path: each block's resnets, its resampler with the last one."""
    for b, block in enumerate(blocks):
        found = getattr(block, f"{kind}samplers", None)
        if found and len(found) != 1:
            raise TypeError(f"exact tiling expects one {kind}sampler per block, found {len(found)}")
        resampler = found[0] if found else None
        for r, resnet in enumerate(block.resnets):
            last = r == len(block.resnets) - 1
            _resnet_segments(resnet, f"{kind}_blocks.{b}.resnets.{r}", resampler if last else None,
                             kind if last and resampler is not None else None, steps)


def decoder_segments(vae) -> list:
    """The decoder as steps: post_quant_conv and conv_in, the mid-block, the up path, norm_out and conv_out."""
    dec = vae.decoder
    if getattr(dec, "conv_norm_out", None) is None or not isinstance(dec.conv_norm_out, nn.GroupNorm):
        raise TypeError("exact tiling needs a decoder ending in a GroupNorm (spatial norm decoders are not supported)")
    _check_conv3(dec.conv_in, "decoder.conv_in")
    steps = [Segment("conv_in", Sequence(getattr(vae, "post_quant_conv", None), dec.conv_in),
                     dec.conv_in.in_channels, dec.conv_in.out_channels, source=-1, halo=1)]
    _mid_block_segments(dec.mid_block, steps)
    _path_segments(dec.up_blocks, "up", steps)
    _check_conv3(dec.conv_out, "decoder.conv_out")
    steps.append(Segment("norm_out", NormActConv(dec.conv_norm_out, dec.conv_act, dec.conv_out),
                         dec.conv_out.in_channels, dec.conv_out.out_channels, source=len(steps) - 1,
                         norm=_norm_info(dec.conv_norm_out), halo=1))
    return steps


def encoder_segments(vae) -> list:
    """The encoder as steps: conv_in, the down path, the mid-block, norm_out with conv_out and quant_conv."""
    enc = vae.encoder
    _check_conv3(enc.conv_in, "encoder.conv_in")
    steps = [Segment("conv_in", ConvIn(enc.conv_in), enc.conv_in.in_channels, enc.conv_in.out_channels,
                     source=-1, halo=1)]
    _path_segments(enc.down_blocks, "down", steps)
    _mid_block_segments(enc.mid_block, steps)
    _check_conv3(enc.conv_out, "encoder.conv_out")
    quant = getattr(vae, "quant_conv", None)
    out = Sequence(NormActConv(enc.conv_norm_out, enc.conv_act, enc.conv_out), quant)
    steps.append(Segment("norm_out", out, enc.conv_out.in_channels,
                         quant.out_channels if quant is not None else enc.conv_out.out_channels,
                         source=len(steps) - 1, norm=_norm_info(enc.conv_norm_out), halo=1))
    return steps
