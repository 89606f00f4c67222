"""Inputs smaller than a backend's minimum size: padded up (edge-replicated), run, cropped back, and announced."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PaddingMixin:
    """`_run_padded`: `_run_batches` on an input at least the backend's min size."""

    def _min_size(self, component: str) -> tuple[int, int] | None:
        limits = self._spatial_limits(component)
        if limits is None:
            return None
        m = self._specs[component].input_multiple
        return tuple(-(-v // m) * m for v in limits[0])

    def _run_padded(self, component: str, x: torch.Tensor) -> torch.Tensor:
        least = self._min_size(component)
        if least is None:
            return self._run_batches(component, x)
        spec = self._specs[component]
        h, w = x.shape[-2:]
        min_h, min_w = least
        pad_h, pad_w = max(0, min_h - h), max(0, min_w - w)
        if not (pad_h or pad_w):
            return self._run_batches(component, x)
        self._notice(("pad", component, h, w),
                     f"{component} input {h}×{w} is smaller than the backend accepts (min {min_h}×{min_w}): padding "
                     f"it (edge-replicated) and cropping the result; GroupNorm and attention see the padding, so the "
                     f"result differs from diffusers' (notice given once per size; a profile with a smaller min "
                     f"avoids it)")
        # Replicate keeps padded statistics close to the image's own.
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        _, _, oh, ow = spec.output_shape(tuple(x.shape))
        return self._run_batches(component, padded)[:, :, :oh, :ow].contiguous()
