"""Blend tiling: diffusers' `AutoencoderKL.tiled_decode` / `_tiled_encode`, result for result.

Tiles, overlaps and blending follow diffusers exactly, so results match diffusers' on the same
weights and tile settings (each tile is normalized with its own statistics: seams and tone shifts
included, as in diffusers). Two differences, neither visible in the result: rows are blended as soon
as they are run (only the previous row is kept), and the output is written into one preallocated
tensor. Tiles below the backend's min are widened back into the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

# diffusers' blending, reused rather than copied; neither function reads `self`.
_blend_v = AutoencoderKL.blend_v
_blend_h = AutoencoderKL.blend_h


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


class BlendTilingMixin:
    """`_blend_plan` and `_run_tiles`: overlapping tiles blended as diffusers does."""

    def _blend_plan(self, component: str, h: int, w: int, wanted: bool) -> TilePlan:
        spec = self._specs[component]
        tile, out_tile = self._tile_sizes(component)
        limits = self._spatial_limits(component)
        max_side = min(limits[1]) if limits else None
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
