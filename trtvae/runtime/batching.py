"""Batch chunking: a batch a backend's profiles cannot take whole runs in chunks they can."""
from __future__ import annotations

import torch


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


class BatchingMixin:
    """`_run_batches`: `_run` over chunks that fit `_batch_ranges`."""

    def _run_batches(self, component: str, x: torch.Tensor) -> torch.Tensor:
        plan = plan_batches(x.shape[0], self._batch_ranges(component, tuple(x.shape)))
        if len(plan) == 1 and plan[0] == (x.shape[0], x.shape[0]):
            return self._run(component, x)
        # A chunk below every min repeats its last image and the extra outputs are dropped.
        outs, start = [], 0
        for take, run in plan:
            chunk = x[start:start + take]
            if run > take:
                chunk = torch.cat([chunk, chunk[-1:].expand(run - take, *chunk.shape[1:])])
            outs.append(self._run(component, chunk.contiguous())[:take])
            start += take
        return torch.cat(outs, dim=0)
