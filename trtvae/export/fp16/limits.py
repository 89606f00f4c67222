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
# Largest GroupNorm variance (the audit's `norm_var_max`) an fp16 graph may hold in fp16. Above it the
# export keeps GroupNorm statistics in fp32 (--fp32-norm) by itself: TensorRT does not document fp32
# accumulation for an fp16 normalization in a strongly typed network (docs/fp16-safety.md), and a
# variance stored in fp16 cannot exceed fp16's largest value.
NORM_VAR_LIMIT = FP16_MAX
# The rescaled model's fp32 outputs must match the original this closely (relative L2) before export.
RESCALE_TOLERANCE = 1e-5


def margin_bits(value: float, limit: float = FP16_MAX) -> float:
    """How many doublings `value` can take before reaching `limit` (negative: already over)."""
    if value is None or value <= 0:
        return math.inf
    if not math.isfinite(value):
        return -math.inf
    return math.log2(limit / value)
