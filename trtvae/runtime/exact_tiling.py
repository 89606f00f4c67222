"""Exact tiling: the same result as the untiled graph, at bounded working memory, for any input size.

The component runs as the export's segment graphs, one step at a time. The mid-block's attention runs
in chunks of query rows against every key and value (`attention_chunk_bytes` bounds the scores held
at once); a "whole" step runs once on the whole tensor. A tiled step
runs once per window (core plus halo), keeps the core of each result, and accumulates the exact
statistics of the GroupNorm that the next step applies, from cores only. Between steps the whole
activation is kept (the boundary tensors), where the backend's data lives. Only running one segment
graph (`_run_segment`) is backend-specific.
"""
from __future__ import annotations

import torch

from .. import defaults
from .segments import GroupStats, last_uses, read_steps, resolution_ratios, windows


class ExactTilingMixin:
    """`_run_exact(component, x)` for a runtime whose manifest lists segment graphs."""

    def _segment_steps(self, component: str) -> list | None:
        cache = self.__dict__.setdefault("_steps_cache", {})
        if component not in cache:
            entry = self.manifest["components"].get(component, {}).get("segments")
            cache[component] = read_steps(entry) if entry else None
        return cache[component]

    def _exact_unavailable(self, component: str) -> str | None:
        """Why this export and backend cannot tile `component` exactly; None when they can."""
        if self._segment_steps(component) is None:
            return (f"{self.directory} holds no {component} segment graphs (exported with --no-segments or by an "
                    "older trtvae)")
        return None

    def _exact_available(self, component: str) -> bool:
        return self._exact_unavailable(component) is None

    def _run_segment(self, component: str, step, inputs: dict) -> torch.Tensor:
        """Run segment graph `step` of `component` on named inputs (x, mean, rstd, residual); return y."""
        raise NotImplementedError

    def _boundary_device(self, x: torch.Tensor) -> torch.device:
        """Where the boundary tensors between segments live: with the input by default (a backend may keep
        them in host memory, so its device holds one window at a time, not the image)."""
        return x.device

    def _exact_core(self, component: str) -> int:
        """Core side in pixels of the component's input (the blend mode's tile, without its overlap)."""
        return self._tile_sizes(component)[0]

    def _run_exact(self, component: str, x: torch.Tensor) -> torch.Tensor:
        steps = self._segment_steps(component)
        last = last_uses(steps)
        ratios = resolution_ratios(steps)
        next_norm = {s.source: s.norm for s in steps if s.norm is not None}  # the GroupNorm applied to a step's output
        core0 = self._exact_core(component)
        outputs, stats = {-1: x.to(self._boundary_device(x))}, {}
        for step in steps:
            src = outputs[step.source]
            inputs = {}
            if step.norm is not None:
                inputs["mean"], inputs["rstd"] = stats.pop(step.source).per_channel(step.norm["eps"], src.device)
            collect = None
            if (norm := next_norm.get(step.index)) is not None:
                collect = GroupStats(src.shape[0], norm["groups"], norm["channels"])
            if step.kind == "tiled":
                num, den = ratios[step.index]
                out = self._run_step_tiles(component, step, src, outputs.get(step.residual), inputs,
                                           core0 * num // den, collect)
            elif step.kind == "attention":
                out = self._run_attention_rows(component, step, src, outputs[step.residual], collect)
            else:
                out = self._run_segment(component, step, {"x": src, **inputs})
                if collect is not None:
                    collect.add(out)
            if collect is not None:
                stats[step.index] = collect
            outputs[step.index] = out
            for used in {step.source, step.residual} - {None, -1}:
                if last.get(used) == step.index:
                    del outputs[used]  # a boundary tensor lives until its last reader has run
        return outputs[steps[-1].index].to(x.device, x.dtype)  # activations travel in float32 between segments

    def _run_attention_rows(self, component, step, qkv, residual, collect) -> torch.Tensor:
        """Attention in chunks of query rows against every key and value: exact, softmax rows are independent."""
        b, _, h, w = qkv.shape
        c = step.out_channels
        kv = qkv[:, c:].contiguous()
        budget = getattr(self, "attention_chunk_bytes", defaults.ATTENTION_CHUNK_BYTES)
        per_row = 2 * b * w * (h * w) * 4  # scores and their softmax, float32 at most
        rows = max(1, min(h, budget // per_row))
        out = None
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            y = self._run_segment(component, step, {"x": qkv[:, :c, r0:r1].contiguous(), "kv": kv,
                                                    "residual": residual[:, :, r0:r1].contiguous()})
            if out is None:
                out = torch.empty((b, c, h, w), dtype=y.dtype, device=qkv.device)
            out[:, :, r0:r1] = y
            if collect is not None:
                collect.add(y)
        return out

    def _run_step_tiles(self, component, step, src, residual, inputs, core, collect) -> torch.Tensor:
        b, _, h, w = src.shape
        up, down = step.upscale, step.downscale
        out = None
        cols = windows(w, core, step.halo, step.align)
        for y0, y1, cy0, cy1 in windows(h, core, step.halo, step.align):
            for x0, x1, cx0, cx1 in cols:
                feed = dict(inputs, x=src[:, :, y0:y1, x0:x1].contiguous())
                if residual is not None:
                    feed["residual"] = residual[:, :, y0:y1, x0:x1].contiguous()
                y = self._run_segment(component, step, feed)
                kept = y[:, :, (cy0 - y0) * up // down:(cy1 - y0) * up // down,
                         (cx0 - x0) * up // down:(cx1 - x0) * up // down]
                if out is None:
                    out = torch.empty((b, step.out_channels, step.out_size(h), step.out_size(w)), dtype=y.dtype,
                                      device=src.device)
                out[:, :, cy0 * up // down:cy1 * up // down, cx0 * up // down:cx1 * up // down] = kept
                if collect is not None:
                    collect.add(kept)
        return out
