"""Accuracy metrics and per-precision thresholds, shared by export-time verify and tests."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Relative L2 error allowed against the PyTorch fp32 reference of the same weights.
REL_L2_THRESHOLD = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}


@dataclass
class ErrorStats:
    max_abs: float
    rel_l2: float
    nonfinite: int
    psnr_db: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def compare(result, reference, image: bool = False) -> ErrorStats:
    """Errors of `result` against `reference`. With image=True also PSNR on [-1, 1]."""
    r, ref = _f64(result), _f64(reference)
    if r.shape != ref.shape:
        raise ValueError(f"result shape {r.shape} differs from reference shape {ref.shape}")
    finite = np.isfinite(r)
    nonfinite = int(r.size - finite.sum())
    diff = np.where(finite, r - ref, np.inf)
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    denom = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(diff)) if nonfinite == 0 else math.inf
    rel = num / denom if denom > 0 else (0.0 if num == 0 else math.inf)
    psnr = None
    if image:
        psnr = psnr_db(r, ref) if nonfinite == 0 else -math.inf
    return ErrorStats(max_abs=max_abs, rel_l2=rel, nonfinite=nonfinite, psnr_db=psnr)


def psnr_db(result, reference) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2), both clamped first as a pipeline would."""
    a = np.clip(_f64(result), -1, 1)
    b = np.clip(_f64(reference), -1, 1)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def passes(stats: ErrorStats, precision: str) -> bool:
    return stats.nonfinite == 0 and stats.rel_l2 <= REL_L2_THRESHOLD[precision]
