"""Exact rescaling of an AutoencoderKL's internal activations: same fp32 outputs, smaller fp16 maxima.

Applies a plan (`plan.py`) with one power of two per scale variable. Powers of two make every
multiplication exact in floating point: the rewritten fp32 model gives the same outputs bit for
bit, barring subnormals.
"""
from __future__ import annotations

import copy
import math

import torch

from .limits import ACT_TARGET
from .plan import ONE, Plan, RescaleError, plan_for  # noqa: F401  (RescaleError: part of this module's API)


@torch.no_grad()
def apply_scales(vae, plan: Plan, exponents: dict) -> None:
    """Rewrite `vae` in place: scale variable v is multiplied by 2**exponents[v] (missing: 0)."""
    modules = dict(vae.named_modules())

    def scale(var):
        return 1.0 if var is ONE else math.ldexp(1.0, int(exponents.get(var, 0)))

    for a in plan.affines:
        m = modules[a.name]
        ratio = scale(a.dst) / scale(a.src)
        if ratio != 1.0:
            m.weight.mul_(ratio)
        if m.bias is not None and scale(a.dst) != 1.0:
            m.bias.mul_(scale(a.dst))
    for n in plan.norms:
        m = modules[n.name]
        m.eps = m.eps * scale(n.src) ** 2


def rescaled_copy(vae, plans: dict, exponents: dict):
    """A deep copy of `vae` with the scales applied; the caller's model is never touched."""
    copy_ = copy.deepcopy(vae)
    for plan in plans.values():
        apply_scales(copy_, plan, exponents)
    return copy_


def choose_exponents(plans: dict, peaks: dict, target: float = ACT_TARGET) -> dict:
    """Per scale variable, the power of two that brings its largest tensor to ≤ target.

    `peaks` maps (layer, "out"|"in") to the audited largest |value|. Only scales down:
    a model already inside the target is left exactly as it is, and weights are not
    pushed towards fp16's subnormal range further than needed.
    """
    exponents = {}
    for plan in plans.values():
        for var, members in plan.members.items():
            peak = max((peaks.get(m, 0.0) for m in members), default=0.0)
            if peak > target:
                exponents[var] = -math.ceil(math.log2(peak / target))
    return exponents
