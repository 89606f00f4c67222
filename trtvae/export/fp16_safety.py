"""What `--precision fp16` does before writing a graph: audit, then rescale exactly if the model overflows.

The caller's fp32 model is never modified: it stays the verify step's reference. The
model to export is either that same object (safe, or --no-rescale) or a rescaled deep copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError
from .audit import AuditResult, run_audit
from .audit_report import print_audit, write_json
from .plots import plot_audit
from .progress import console, stage
from .rescale import ACT_TARGET, choose_exponents, rescaled_copy

# Rewritten fp32 outputs must match the original this closely (relative L2) before export.
RESCALE_TOLERANCE = 1e-5
AUDIT_JSON = "fp16_audit.json"
AUDIT_PNG = "fp16_audit.png"


@dataclass
class Rescaled:
    vae: object
    exponents: dict
    before: AuditResult
    after: AuditResult
    rel_error: float
    summary: dict = field(default_factory=dict)


def relative_difference(a: AuditResult, b: AuditResult) -> float:
    """Largest relative L2 difference between two audits' graph outputs (same calibration)."""
    worst = 0.0
    for component, outs in a.outputs.items():
        for x, y in zip(outs, b.outputs[component]):
            denom = float(y.norm()) or 1.0
            worst = max(worst, float((x - y).norm()) / denom)
    return worst if math.isfinite(worst) else math.inf


def rescale(vae, audit: AuditResult, calibration: dict, target: float = ACT_TARGET) -> Rescaled:
    """Rescale a copy of `vae` from `audit`; re-audit it and check its fp32 outputs are unchanged."""
    exponents = choose_exponents(audit.plans, audit.peaks(), target)
    copy_ = rescaled_copy(vae, audit.plans, exponents)
    after = run_audit(copy_, tuple(audit.outputs), calibration)
    rel = relative_difference(after, audit)
    if rel > RESCALE_TOLERANCE:
        raise ExportError(f"the rescaled model's fp32 outputs differ from the original's by {rel:.2e} "
                          f"(relative L2, limit {RESCALE_TOLERANCE:g}); export with --precision bf16 or fp32")
    if not after.fp16_safe:  # every overflowing tensor had a scale, so this means a plan bug: never export it
        raise ExportError(f"rescaling left {after.worst.name} at {after.worst.max_abs:.4g}; "
                          "export with --precision bf16 or fp32")
    summary = {
        "applied": True,
        "target_max_abs": target,
        "exponents": {k: v for k, v in exponents.items()},
        "max_abs_before": audit.worst.max_abs,
        "max_abs_after": after.worst.max_abs,
        "margin_bits_after": round(after.margin_bits, 2),
        "fp32_rel_l2_vs_original": rel,
    }
    return Rescaled(copy_, exponents, audit, after, rel, summary)


def prepare_fp16(vae, components, out: Path | None, rescale_enabled: bool = True, fp32_norm: bool = False):
    """Audit `vae` for fp16; return (model to export, manifest record). Raises if fp16 cannot work."""
    calibration = None
    with stage("fp16 audit") as info:
        from .calibration import calibration_inputs

        calibration = calibration_inputs(vae, components)
        audit = run_audit(vae, components, calibration)
        info["detail"] = (f"max |activation| {audit.worst.max_abs:.4g} at {audit.worst.name}, "
                          f"margin {audit.margin_bits:+.1f} bits")
    record = {"audit": audit.summary(), "rescale": {"applied": False}, "fp32_norm": fp32_norm}
    files = {}
    if out is not None:
        # The plot costs ~1.5 s of matplotlib on every export; it is drawn where there is something to see
        # (overflow found). `vae-export audit` always draws it.
        files = {"json": AUDIT_JSON} if audit.fp16_safe else {"json": AUDIT_JSON, "plot": AUDIT_PNG}
        record["audit"]["files"] = files
    export_vae, after = vae, None
    if audit.fp16_safe:
        print_audit(audit, rows=5)
    elif not rescale_enabled:
        print_audit(audit)
        console.print("[yellow]! --no-rescale: exporting the overflowing model as it is; verify will judge it[/]")
    elif audit.rescale_possible:
        print_audit(audit)
        with stage("exact fp16 rescaling") as info:
            done = rescale(vae, audit, calibration)
            info["detail"] = (f"max |activation| {done.summary['max_abs_before']:.4g} → "
                              f"{done.summary['max_abs_after']:.4g}, fp32 outputs equal within {done.rel_error:.1e}")
        export_vae, after = done.vae, done.after
        record["rescale"] = done.summary
        record["audit_after_rescale"] = after.summary()
        console.print(f"Rescaled {len(done.exponents)} activation groups by powers of two: "
                      f"max |activation| {done.summary['max_abs_before']:.4g} → {done.summary['max_abs_after']:.4g}")
    elif fp32_norm:
        print_audit(audit)
        # --fp32-norm keeps statistics in fp32; it does not shrink the overflowing activations. The user
        # asked for an fp16 graph with it anyway: export, and let verify decide.
        console.print("[yellow]! fp16 overflows where rescaling cannot reach; --fp32-norm given: exporting anyway "
                      "(fp32 GroupNorm statistics do not fix overflowing activations), verify will judge it[/]")
    else:
        print_audit(audit)
        _write(out, files, audit, after)
        raise ExportError(f"fp16 export stopped: {audit.advice()}. To export the fp16 graph anyway and let "
                          "verify judge it, pass --no-rescale or --fp32-norm")
    _write(out, files, audit, after)
    return export_vae, record


def _write(out, files, audit, after) -> None:
    if not files:
        return
    write_json(Path(out) / files["json"], audit,
               {"after_rescale": after.as_dict()} if after is not None else None)
    if "plot" in files:
        plot_audit(Path(out) / files["plot"], audit, after=after, target=ACT_TARGET)
