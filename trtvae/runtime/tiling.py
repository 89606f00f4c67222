"""Slicing and tiling for `VaeRuntime`, with diffusers' AutoencoderKL semantics.

Tiles, overlaps and blending follow `AutoencoderKL.tiled_decode` / `_tiled_encode` exactly, so
results match diffusers' on the same weights and tile settings. Two differences, neither
visible in the result: rows are blended as soon as they are run (only the previous row is
kept), and the output is written into one preallocated tensor, so memory is the output plus
two rows of tiles rather than every tile at once. A backend whose engine accepts a bounded
size range (`_spatial_limits`) is tiled automatically above its max; tiles below its min are
widened back into the input, and only an input smaller than the min is padded.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

from .. import defaults
from ..components import DECODER

# diffusers' blending, reused rather than copied; neither function reads `self`.
_blend_v = AutoencoderKL.blend_v
_blend_h = AutoencoderKL.blend_h


class TilingNotice(UserWarning):
    """An input was tiled or its tile size reduced because the backend cannot run it whole."""


@dataclass(frozen=True)
class TilePlan:
    """One tiling in the component's own units: `tile`/`stride` in input pixels, `blend`/`keep` in output pixels."""

    tile: int
    stride: int
    blend: int
    keep: int


def _widen(start: int, end: int, least: int, size: int) -> tuple[int, int]:
    """A window of at least `least` within [0, size) holding [start, end): backwards first, where an edge
    tile's neighbours are. Ends stay on the input grid when start, end, least and size are on it."""
    if end - start >= least:
        return start, end
    lo = max(0, end - least)
    return lo, min(size, lo + least)


class TilingMixin:
    """enable_tiling / enable_slicing and the tile attributes, as on diffusers' AutoencoderKL."""

    def _init_tiling(self) -> None:
        self.use_slicing = False
        self.use_tiling = False
        sample_size = self.config.get("sample_size", defaults.TILE_SAMPLE_SIZE)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        self.tile_sample_min_size = int(sample_size)
        self.tile_latent_min_size = int(sample_size / self.spatial_factor)
        self.tile_overlap_factor = defaults.TILE_OVERLAP_FACTOR
        self._noticed: set = set()

    def enable_tiling(self) -> None:
        """Decode and encode in overlapping tiles when the input is larger than one tile."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Decode and encode one image of a batch at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # --- the path every validated input takes ----------------------------------------
    def _sliced_forward(self, component: str, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([self._tiled_forward(component, s) for s in x.split(1)])
        return self._tiled_forward(component, x)

    def _tiled_forward(self, component: str, x: torch.Tensor) -> torch.Tensor:
        plan = self._tile_plan(component, x.shape[-2], x.shape[-1])
        if plan is None:
            return self._run_padded(component, x)
        return self._run_tiles(component, x, plan)

    def _tile_sizes(self, component: str) -> tuple[int, int]:
        """(input tile, output tile) in pixels of this component's input and output."""
        if component == DECODER:
            return self.tile_latent_min_size, self.tile_sample_min_size
        return self.tile_sample_min_size, self.tile_latent_min_size

    def _tile_plan(self, component: str, h: int, w: int) -> TilePlan | None:
        spec = self._specs[component]
        tile, out_tile = self._tile_sizes(component)
        limits = self._spatial_limits(component)
        max_side = min(limits[1]) if limits else None
        oversized = limits is not None and (h > limits[1][0] or w > limits[1][1])
        wanted = self.use_tiling and (h > tile or w > tile)
        if not (wanted or oversized):
            return None
        shrunk = max_side is not None and tile > max_side
        if shrunk:
            tile = self._fit_tile(spec, max_side)
            out_tile = tile * spec.upscale // spec.downscale
        if shrunk or not wanted:
            self._notice(component, f"{component} input {h}×{w} is larger than the backend accepts (max "
                                    f"{limits[1][0]}×{limits[1][1]}): running it in overlapping tiles of "
                                    f"{tile}×{tile} (notice given once; a larger engine profile avoids tiling)")
        o = self.tile_overlap_factor
        plan = TilePlan(tile=tile, stride=int(tile * (1 - o)), blend=int(out_tile * o),
                        keep=out_tile - int(out_tile * o))
        self._check_plan(spec, plan)
        return plan

    def _fit_tile(self, spec, max_side: int) -> int:
        """Largest tile ≤ max_side whose size and stride are multiples of the input multiple."""
        m = spec.input_multiple
        for tile in range(max_side - max_side % m, 0, -m):
            stride = int(tile * (1 - self.tile_overlap_factor))
            if stride > 0 and stride % m == 0:
                return tile
        raise ValueError(f"{spec.name}: the backend's max size {max_side} leaves no usable tile "
                         f"(multiple of {m}, overlap {self.tile_overlap_factor})")

    def _check_plan(self, spec, plan: TilePlan) -> None:
        m = spec.input_multiple
        if plan.stride <= 0 or plan.tile % m or plan.stride % m:
            raise ValueError(
                f"{spec.name} tiling: tile {plan.tile} px with overlap factor {self.tile_overlap_factor} gives a "
                f"stride of {plan.stride} px; both must be positive multiples of {m} so every tile is a valid "
                f"{spec.name} input (adjust tile_sample_min_size / tile_overlap_factor)"
            )

    def _notice(self, component: str, text: str) -> None:
        if component in self._noticed:
            return
        self._noticed.add(component)
        warnings.warn(text, TilingNotice, stacklevel=7)

    # --- running -----------------------------------------------------------------------
    def _run_tiles(self, component: str, x: torch.Tensor, plan: TilePlan) -> torch.Tensor:
        spec = self._specs[component]
        h, w = x.shape[-2:]
        starts_y, starts_x = range(0, h, plan.stride), range(0, w, plan.stride)
        rows = [min(plan.keep, spec.output_shape((1, 0, min(plan.tile, h - i), 1))[2]) for i in starts_y]
        cols = [min(plan.keep, spec.output_shape((1, 0, 1, min(plan.tile, w - j)))[3]) for j in starts_x]
        out = torch.empty((x.shape[0], spec.out_channels, sum(rows), sum(cols)), dtype=x.dtype, device=x.device)
        above, y = None, 0
        for i, height in zip(starts_y, rows):
            row = [self._run_tile(component, x, i, j, plan.tile) for j in starts_x]
            xpos = 0
            for j, tile in enumerate(row):
                # Same order of in-place blends as diffusers: vertical with the blended tile above, then
                # horizontal with the fully blended tile to the left.
                if above is not None:
                    tile = _blend_v(self, above[j], tile, plan.blend)
                if j > 0:
                    tile = _blend_h(self, row[j - 1], tile, plan.blend)
                row[j] = tile
                kept = tile[:, :, :plan.keep, :plan.keep]
                out[:, :, y:y + kept.shape[2], xpos:xpos + kept.shape[3]] = kept
                xpos += kept.shape[3]
            y += height
            above = row
        return out

    def _min_size(self, component: str) -> tuple[int, int] | None:
        limits = self._spatial_limits(component)
        if limits is None:
            return None
        m = self._specs[component].input_multiple
        return tuple(-(-v // m) * m for v in limits[0])

    def _run_tile(self, component: str, x: torch.Tensor, i: int, j: int, tile: int) -> torch.Tensor:
        """The tile x[i:i+tile, j:j+tile]; one below the backend's min is widened into the input around it.

        Real neighbouring pixels, cropped off afterwards, disturb the tile far less than padding would:
        a 64-px edge tile padded to a 512-px min would be mostly replicated border.
        """
        spec = self._specs[component]
        h, w = x.shape[-2:]
        i1, j1 = min(i + tile, h), min(j + tile, w)
        least = self._min_size(component)
        if least is None:
            return self._run_padded(component, x[:, :, i:i1, j:j1].contiguous())
        (a, b), (c, d) = _widen(i, i1, least[0], h), _widen(j, j1, least[1], w)
        y = self._run_padded(component, x[:, :, a:b, c:d].contiguous())
        if (a, b, c, d) == (i, i1, j, j1):
            return y
        up, down = spec.upscale, spec.downscale
        return y[:, :, (i - a) * up // down:(i1 - a) * up // down, (j - c) * up // down:(j1 - c) * up // down]

    def _run_padded(self, component: str, x: torch.Tensor) -> torch.Tensor:
        """Run `x`, padded up to the backend's min size (edge-replicated) and cropped back."""
        least = self._min_size(component)
        if least is None:
            return self._run_batches(component, x)
        spec = self._specs[component]
        h, w = x.shape[-2:]
        min_h, min_w = least
        pad_h, pad_w = max(0, min_h - h), max(0, min_w - w)
        if not (pad_h or pad_w):
            return self._run_batches(component, x)
        # Replicate keeps padded statistics close to the image's own; GroupNorm and attention see the padding,
        # so edge values differ slightly from an unpadded run.
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        _, _, oh, ow = spec.output_shape(tuple(x.shape))
        return self._run_batches(component, padded)[:, :, :oh, :ow].contiguous()

    def _run_batches(self, component: str, x: torch.Tensor) -> torch.Tensor:
        plan = plan_batches(x.shape[0], self._batch_ranges(component, tuple(x.shape)))
        if len(plan) == 1 and plan[0] == (x.shape[0], x.shape[0]):
            return self._run(component, x)
        # Batches a profile cannot take whole run in chunks it can; a chunk below every min repeats its
        # last image and the extra outputs are dropped.
        outs, start = [], 0
        for take, run in plan:
            chunk = x[start:start + take]
            if run > take:
                chunk = torch.cat([chunk, chunk[-1:].expand(run - take, *chunk.shape[1:])])
            outs.append(self._run(component, chunk.contiguous())[:take])
            start += take
        return torch.cat(outs, dim=0)


def plan_batches(n: int, ranges: list) -> list:
    """Split a batch of n into (images taken, batch run) chunks that each fit one of `ranges`."""
    plan = []
    while n > 0:
        if any(lo <= n <= hi for lo, hi in ranges):
            plan.append((n, n))
            break
        below = [hi for _, hi in ranges if hi < n]
        if below:  # too many for any range that would hold them: take the largest that fits
            plan.append((max(below), max(below)))
            n -= max(below)
            continue
        plan.append((n, min(lo for lo, _ in ranges)))  # fewer than every min: pad up
        break
    return plan
