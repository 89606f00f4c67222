"""What to do about an audit, decided without printing or writing anything.

Pure functions of audit results, so each branch is testable on its own and the export and
`vae-export audit` cannot disagree.
"""
from __future__ import annotations

import enum
import math

from ...errors import ExportError, VerificationError
from .audit import AuditResult
from .limits import FP16_MAX, NORM_VAR_LIMIT, RESCALE_TOLERANCE


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


class Fp16OverflowError(VerificationError):
    """The audited fp16 graph holds values above 65504: never a loadable export, whatever verify says."""


def overflows_fp16(record: dict) -> bool:
    """Whether the graph that is exported (the rescaled copy where rescaling ran) holds values above 65504."""
    return (record.get("audit_after_rescale") or record["audit"])["max_abs"] > FP16_MAX


def overflow_gate(record: dict, verify: dict | None = None) -> str | None:
    """Why the exported fp16 graph must not become an export (one line), or None when it fits fp16.

    Judged on the audit of the graph that is exported (the rescaled copy where rescaling ran), not on
    verify: ONNX Runtime's CPU kernels run parts of an fp16 graph in fp32 (a residual Add feeding an
    InstanceNormalization, measured: 1.4e5 stays finite there), so its verify can pass on a graph
    that gives NaN on fp16 runtimes such as TensorRT; and verify may not run at all (--no-verify).
    `verify`: the verify record, or {"status": "failed", "reason": ...}, to say what it found.
    """
    if not overflows_fp16(record):
        return None
    audit = record.get("audit_after_rescale") or record["audit"]
    status = (verify or {}).get("status")
    head = "verify passed, but the audit measured" if status == "passed" else "the audit measured"
    declared = "; the source declares force_upcast: true" if record["audit"].get("declares_force_upcast") else ""
    found = {"failed": f"; verify failed too ({(verify or {}).get('reason')})",
             "passed": "", None: ""}.get(status, f"; verify {str(status).replace('_', ' ')}")
    fix = ("export with the exact rescaling (without --no-rescale) or with --precision bf16 or fp32"
           if audit.get("rescale_possible") else "export with --precision bf16 or fp32")
    return (f"fp16 overflow: {head} |activation| {audit['max_abs']:.6g} > {FP16_MAX:g} at {audit['worst_layer']} "
            f"in the exported fp16 graph{declared}: fp16 runtimes (TensorRT) would give NaN there, whatever ONNX "
            f"Runtime's CPU kernels show{found}. No manifest was written: {fix}")


def norms_over_limit(audit: AuditResult) -> list:
    """GroupNorms whose measured variance (`norm_var_max`) does not fit fp16, worst first."""
    over = [s for s in audit.layers if s.norm_var_max is not None and s.norm_var_max > NORM_VAR_LIMIT]
    return sorted(over, key=lambda s: s.norm_var_max, reverse=True)


def needs_fp32_norm(audit: AuditResult) -> str | None:
    """Why GroupNorm statistics must be kept in fp32 in this model's fp16 graph (one phrase), or None."""
    over = norms_over_limit(audit)
    if not over:
        return None
    more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
    return f"GroupNorm variance {over[0].norm_var_max:.3g} at {over[0].name}{more} exceeds {NORM_VAR_LIMIT:g}"
