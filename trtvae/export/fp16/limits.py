"""Every fp16 limit and tolerance the audit, the rescaling and their reports use, in one place."""
from __future__ import annotations

import math

FP16_MAX = 65504.0  # the largest finite fp16 value
# Every stored activation must stay this many doublings below FP16_MAX: real images can be
# rougher than the calibration set.
HEADROOM_BITS = 1.0
# Largest activation wanted after rescaling: 4 bits below fp16's 65504, so inputs rougher
# than the calibration set still fit, and 26 bits above fp16's subnormals.
ACT_TARGET = 2.0 ** 12
# The rescaled model's fp32 outputs must match the original this closely (relative L2) before export.
RESCALE_TOLERANCE = 1e-5


def margin_bits(value: float, limit: float = FP16_MAX) -> float:
    """How many doublings `value` can take before reaching `limit` (negative: already over)."""
    if value is None or value <= 0:
        return math.inf
    if not math.isfinite(value):
        return -math.inf
    return math.log2(limit / value)
