"""What to do about an audit, decided without printing or writing anything.

Pure functions of audit results, so each branch is testable on its own and the export and
`vae-export audit` cannot disagree.
"""
from __future__ import annotations

import enum
import math

from ...errors import ExportError, VerificationError
from .audit import AuditResult
from .limits import FP16_MAX, RESCALE_TOLERANCE


class Action(enum.Enum):
    SAFE = "safe"  # export the model as it is
    RESCALE = "rescale"  # export a rescaled copy
    EXPORT_UNSAFE = "export-unsafe"  # --no-rescale, or --fp32-norm where rescaling cannot reach: verify judges
    STOP = "stop"  # overflow that rescaling cannot reach and no flag asking to export anyway


def decide(audit: AuditResult, rescale_enabled: bool = True, fp32_norm: bool = False) -> Action:
    if audit.fp16_safe:
        return Action.SAFE
    if not rescale_enabled:
        return Action.EXPORT_UNSAFE
    if audit.rescale_possible:
        return Action.RESCALE
    # --fp32-norm keeps statistics in fp32; it does not shrink overflowing activations, but the user
    # asked for an fp16 graph with it: export, and let verify decide.
    return Action.EXPORT_UNSAFE if fp32_norm else Action.STOP


def relative_difference(a: AuditResult, b: AuditResult) -> float:
    """Largest relative L2 difference between two audits' graph outputs (same calibration)."""
    worst = 0.0
    for component, outs in a.outputs.items():
        for x, y in zip(outs, b.outputs[component]):
            denom = float(y.norm()) or 1.0
            worst = max(worst, float((x - y).norm()) / denom)
    return worst if math.isfinite(worst) else math.inf


def judge_rescaled(before: AuditResult, after: AuditResult) -> float:
    """The rescaled model must give the original's fp32 outputs and fit fp16; return its output difference."""
    rel = relative_difference(after, before)
    if rel > RESCALE_TOLERANCE:
        raise ExportError(f"the rescaled model's fp32 outputs differ from the original's by {rel:.2e} "
                          f"(relative L2, limit {RESCALE_TOLERANCE:g}); export with --precision bf16 or fp32")
    if not after.fp16_safe:  # every overflowing tensor had a scale, so this means a plan bug: never export it
        raise ExportError(f"rescaling left {after.worst.name} at {after.worst.max_abs:.4g}; "
                          "export with --precision bf16 or fp32")
    return rel


def check_verify_against_audit(record: dict, verify: dict) -> None:
    """A passing verify must not stand where the audit measured overflow in the graph that was exported.

    ONNX Runtime's CPU kernels run parts of an fp16 graph in fp32 (a residual Add feeding an
    InstanceNormalization, measured: 1.4e5 stays finite there), so its verify can pass on a graph
    that gives NaN on fp16 runtimes such as TensorRT. The audit measured the exported model itself.
    """
    audit = record.get("audit_after_rescale") or record["audit"]
    if verify.get("status") != "passed" or audit["max_abs"] <= FP16_MAX:
        return
    declared = "; the source declares force_upcast: true" if record["audit"].get("declares_force_upcast") else ""
    raise VerificationError(
        f"verify passed, but the audit measured |activation| {audit['max_abs']:.4g} > {FP16_MAX:g} at "
        f"{audit['worst_layer']} in the exported fp16 graph{declared}: ONNX Runtime's CPU kernels run parts of "
        "an fp16 graph in fp32 and hide it; fp16 runtimes (TensorRT) would give NaN. Export with the exact rescaling "
        "(without --no-rescale) or with --precision bf16 or fp32. No manifest was written")
