"""The diffusers-facing switches (enable_tiling, enable_slicing, tile sizes) and the choice of path per input.

Paths: whole (padded up to a backend's min where needed), exact tiling (segment graphs; the same result
as the whole run), or blend tiling (diffusers' own). `enable_tiling()` chooses exact wherever the export
holds segment graphs; an input beyond the backend's max size is tiled even without it.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from .. import defaults
from ..components import DECODER
from ..profiles import default_tiles
from .batching import BatchingMixin
from .blend_tiling import BlendTilingMixin
from .exact_tiling import ExactTilingMixin
from .padding import PaddingMixin

TILING_MODES = ("exact", "blend")
_RUNTIME_DIR = str(Path(__file__).resolve().parent)


class TilingNotice(UserWarning):
    """An input was tiled, padded, or its tiling changed because the backend or export cannot do otherwise."""


def _caller_stacklevel() -> int:
    """The stacklevel that points a warning at the first frame outside trtvae.runtime."""
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve().parent) == _RUNTIME_DIR:
        frame, level = frame.f_back, level + 1
    return level


class TilingMixin(ExactTilingMixin, BlendTilingMixin, PaddingMixin, BatchingMixin):
    """enable_tiling / enable_slicing and the tile attributes, as on diffusers' AutoencoderKL, plus `tiling_mode`."""

    def _init_tiling(self) -> None:
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size, self.tile_latent_min_size = default_tiles(self.config, self.spatial_factor)
        self.tile_overlap_factor = defaults.TILE_OVERLAP_FACTOR
        self._noticed: set = set()
        self.tiling_mode = "blend" if self.exact_tiling_unavailable else "exact"

    @property
    def exact_tiling_unavailable(self) -> str:
        """Why this runtime cannot tile exactly (one line naming each component's reason); "" when it can."""
        return "; ".join(r for r in map(self._exact_unavailable, self.manifest["components"]) if r)

    def enable_tiling(self, mode: str | None = None) -> None:
        """Decode and encode in tiles when the input is larger than one tile.

        mode: "exact" (the default where the export holds segment graphs: the same result as the untiled
        run) or "blend" (diffusers' own tiling, identical to `AutoencoderKL.tiled_decode`, seams included).
        """
        if mode is not None and mode not in TILING_MODES:
            raise ValueError(f"enable_tiling(mode={mode!r}): expected one of {', '.join(TILING_MODES)} or None")
        why = self.exact_tiling_unavailable
        if mode == "exact" and why:
            raise ValueError(f"enable_tiling(mode='exact'): {why}; re-export with this trtvae (without "
                             "--no-segments) for exact tiling")
        if mode is None and why:
            self._notice("no-segments", f"{why}: tiling blends tiles as diffusers does, with visible seams and "
                                        "tone shifts; re-export with this trtvae (without --no-segments) for exact "
                                        "tiling")
        self.tiling_mode = mode or ("blend" if why else "exact")
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Decode and encode one image of a batch at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _notice(self, key, text: str) -> None:
        if key in self._noticed:
            return
        self._noticed.add(key)
        warnings.warn(text, TilingNotice, stacklevel=_caller_stacklevel())

    # --- the path every validated input takes ----------------------------------------
    def _sliced_forward(self, component: str, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([self._tiled_forward(component, s) for s in x.split(1)])
        return self._tiled_forward(component, x)

    def _tiled_forward(self, component: str, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tile = self._tile_sizes(component)[0]
        limits = self._spatial_limits(component)
        oversized = limits is not None and (h > limits[1][0] or w > limits[1][1])
        wanted = self.use_tiling and (h > tile or w > tile)
        if not (wanted or oversized):
            return self._run_padded(component, x)
        if self.tiling_mode == "exact" and self._exact_available(component):
            if not wanted:
                self._notice(component, f"{component} input {h}×{w} is larger than the backend accepts (max "
                                        f"{limits[1][0]}×{limits[1][1]}): tiling it exactly (segment graphs, the "
                                        f"same result as one run; notice given once)")
            return self._run_exact(component, x)
        return self._run_tiles(component, x, self._blend_plan(component, h, w, wanted))

    def _tile_sizes(self, component: str) -> tuple[int, int]:
        """(input tile, output tile) in pixels of this component's input and output."""
        if component == DECODER:
            return self.tile_latent_min_size, self.tile_sample_min_size
        return self.tile_sample_min_size, self.tile_latent_min_size
