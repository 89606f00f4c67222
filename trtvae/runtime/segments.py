"""What exact tiling needs besides running a graph: the steps the manifest lists, windows, and GroupNorm statistics.

Invariants: every output pixel of a tiled step is computed from a window that holds the step's full
halo (or reaches the image edge, where the graph's zero padding is the whole model's); cores of one
step partition its output, so statistics summed over cores are the whole tensor's, each pixel once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profiles import segment_window


@dataclass(frozen=True)
class Step:
    """One segment graph as the manifest lists it (see trtvae/export/segments.py)."""

    index: int
    name: str  # files are read through the manifest (manifest.segment_bytes), which checks their sha256
    kind: str  # "tiled" (windows), "whole", or "attention" (query rows against all keys and values)
    source: int  # step whose output is this step's input x; -1: the component's input
    residual: int | None
    norm: dict | None  # {"groups", "eps", "channels"} of the GroupNorm applied to x
    halo: int  # input pixels each window needs beyond its core, on every side
    upscale: int
    downscale: int
    align: int  # window starts are multiples of this (stride-2 downsamplers)
    out_channels: int

    def out_size(self, n: int) -> int:
        return n * self.upscale // self.downscale


def read_steps(entry: dict) -> list:
    """The manifest's segments entry as Steps, checked for what the runtime relies on."""
    steps = []
    for i, s in enumerate(entry["steps"]):
        step = Step(i, s["name"], s["kind"], int(s["source"]), s.get("residual"),
                    s.get("norm"), int(s["halo"]), int(s["upscale"]), int(s["downscale"]), int(s.get("align", 1)),
                    int(s["out_channels"]))
        if step.kind not in ("tiled", "whole", "attention"):
            raise ValueError(f"segment {i} ({step.name}) has kind {step.kind!r}: this trtvae runs tiled, whole, "
                             "attention; re-export with it")
        if not -1 <= step.source < i or (step.residual is not None and not -1 <= step.residual < i):
            raise ValueError(f"segment {i} ({step.name}) reads a later step: the manifest's segment list is broken")
        steps.append(step)
    return steps


def last_uses(steps: list) -> dict:
    """{step index: index of the last step reading its output}, so outputs are freed as soon as possible."""
    last = {}
    for step in steps:
        for used in (step.source, step.residual):
            if used is not None:
                last[used] = step.index
    return last


def resolution_ratios(steps: list) -> list:
    """Each step's input size relative to the component's input, as (numerator, denominator)."""
    ratios = []
    for step in steps:
        num, den = (1, 1) if step.source < 0 else _times(ratios[step.source], steps[step.source])
        ratios.append((num, den))
    return ratios


def _times(ratio: tuple, step: Step) -> tuple:
    return ratio[0] * step.upscale, ratio[1] * step.downscale


def windows(size: int, core: int, halo: int, align: int) -> list:
    """[(window start, window end, core start, core end)] along one axis of `size` input pixels.

    Cores of `core` pixels partition [0, size); every window has the same length (edge windows are
    shifted inward), so a backend with static shapes sees one size per step.
    """
    core = max(align, core - core % align)
    length = min(size, segment_window(core, halo, align))  # the side TensorRT segment plans are built for
    out = []
    for c0 in range(0, size, core):
        c1 = min(c0 + core, size)
        start = min(max(c0 - halo, 0), size - length)
        if start % align or (size - length) % align:
            raise ValueError(f"window start {start} of a {size}-pixel axis is not a multiple of {align}")
        out.append((start, start + length, c0, c1))
    return out


class GroupStats:
    """Exact per-sample, per-group mean and biased variance of a tensor seen in cores.

    Each core's count, mean and sum of squared deviations are two float32 passes (torch's cascaded sums;
    deviations from the core's own mean, never E[x²] − E[x]²): 1.7e-7 from float64 on a mean-50 group of
    0.5M values, at a sixth of torch.var_mean's time. Cores are merged in float64 with Chan's parallel
    formula, so the result does not depend on how the tensor was cut.
    """

    def __init__(self, batch: int, groups: int, channels: int):
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        self.groups, self.channels = groups, channels
        self.count = 0
        self.mean = torch.zeros(batch, groups, dtype=torch.float64)
        self.m2 = torch.zeros(batch, groups, dtype=torch.float64)

    def add(self, core: torch.Tensor) -> None:
        grouped = core.unflatten(1, (self.groups, -1))  # a view: a cropped core is not copied
        mean = grouped.mean(dim=(2, 3, 4), keepdim=True)
        m2 = (grouped - mean).square_().sum(dim=(2, 3, 4))
        self._merge(grouped[0, 0].numel(), mean.flatten(1).cpu().double(), m2.cpu().double())

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta * delta * (self.count * n / total)
        self.count = total

    def per_channel(self, eps: float, device) -> tuple:
        """(mean, rstd) as float32 [B, C], each group's value repeated over its channels."""
        var = self.m2 / self.count
        rstd = torch.rsqrt(var + eps)
        repeat = self.channels // self.groups
        return tuple(t.repeat_interleave(repeat, dim=1).to(device, torch.float32).contiguous()
                     for t in (self.mean, rstd))
