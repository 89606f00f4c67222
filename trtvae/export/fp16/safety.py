"""The fp16 path in order: audit → decide → rescale (a copy) → re-audit → judge → report.

Used by `vae-export --precision fp16` (`make_fp16_safe`) and `vae-export audit` (`audit_command`).
The caller's fp32 model is never modified: it stays the verify step's reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ... import defaults
from ...errors import ExportError
from ..progress import console, stage
from .audit import AuditResult, audit_model
from .decide import Action, decide, judge_rescaled, needs_fp32_norm
from .limits import ACT_TARGET, FP16_MAX
from .report import AUDIT_JSON, AUDIT_PNG, plot_audit, print_audit, write_audit_files, write_json
from .rescale import choose_exponents, rescaled_copy


@dataclass
class Rescaled:
    vae: object
    exponents: dict
    before: AuditResult
    after: AuditResult
    rel_error: float
    summary: dict = field(default_factory=dict)


def rescale(vae, audit: AuditResult, target: float = ACT_TARGET) -> Rescaled:
    """A rescaled copy of `vae`, audited on the same calibration and judged exact."""
    exponents = choose_exponents(audit.plans, audit.peaks(), target)
    copy_ = rescaled_copy(vae, audit.plans, exponents)
    after = audit_model(copy_, tuple(audit.outputs), audit.inputs)
    rel = judge_rescaled(audit, after)
    summary = {
        "applied": True,
        "target_max_abs": target,
        "exponents": dict(exponents),
        "max_abs_before": audit.worst.max_abs,
        "max_abs_after": after.worst.max_abs,
        "margin_bits_after": round(after.margin_bits, 2),
        "fp32_rel_l2_vs_original": rel,
    }
    return Rescaled(copy_, exponents, audit, after, rel, summary)


def make_fp16_safe(vae, components, out: Path | None, rescale_enabled: bool = True, fp32_norm: bool = False,
                   images: Path | None = None):
    """Audit `vae` for fp16; return (model to export, manifest record). Raises if fp16 cannot work.

    `images`: a folder of the user's images added to the calibration set.
    """
    with stage("fp16 audit") as info:
        audit = audit_model(vae, components, image_dir=images)
        info["detail"] = (f"max |activation| {audit.worst.max_abs:.4g} at {audit.worst.name}, "
                          f"margin {audit.margin_bits:+.1f} bits")
    action = decide(audit, rescale_enabled, fp32_norm)
    record = {"audit": audit.summary(), "rescale": {"applied": False}, "fp32_norm": fp32_norm}
    files = {}
    if out is not None:
        # The plot costs ~1.5 s of matplotlib on every export; it is drawn where there is something to see
        # (overflow found). `vae-export audit` always draws it.
        files = {"json": AUDIT_JSON} if action is Action.SAFE else {"json": AUDIT_JSON, "plot": AUDIT_PNG}
        record["audit"]["files"] = files
    print_audit(audit, rows=defaults.AUDIT_ROWS_EXPORT if action is Action.SAFE else defaults.AUDIT_ROWS)
    export_vae, after = vae, None
    if action is Action.RESCALE:
        with stage("exact fp16 rescaling") as info:
            done = rescale(vae, audit)
            info["detail"] = (f"max |activation| {done.summary['max_abs_before']:.4g} → "
                              f"{done.summary['max_abs_after']:.4g}, fp32 outputs equal within {done.rel_error:.1e}")
        export_vae, after = done.vae, done.after
        record["rescale"] = done.summary
        record["audit_after_rescale"] = after.summary()
        console.print(f"Rescaled {len(done.exponents)} activation groups by powers of two: "
                      f"max |activation| {done.summary['max_abs_before']:.4g} → {done.summary['max_abs_after']:.4g}")
    # Above 65504 the export writes no manifest whatever verify says (decide.overflow_gate): the flags
    # then export the graph for inspection only, and say so up front.
    doomed = audit.worst is not None and audit.worst.max_abs > FP16_MAX
    inspect_only = (f"; the audit measured {audit.worst.max_abs:.4g} > {FP16_MAX:g}, so no manifest will be "
                    "written and the ONNX files are kept for inspection only") if doomed else ""
    if action is Action.EXPORT_UNSAFE and not rescale_enabled:
        console.print(f"[yellow]! --no-rescale: exporting the overflowing model as it is; verify will judge it"
                      f"{inspect_only}[/]")
    elif action is Action.EXPORT_UNSAFE:
        console.print("[yellow]! fp16 overflows where rescaling cannot reach; --fp32-norm given: exporting anyway "
                      f"(fp32 GroupNorm statistics do not fix overflowing activations), verify will judge it"
                      f"{inspect_only}[/]")
    # The statistics of the graph that is exported are judged: the rescaled copy's where rescaling ran.
    judged = after or audit
    why = needs_fp32_norm(judged)
    record["norm_stats"] = {"var_max": max((s.norm_var_max or 0.0 for s in judged.layers), default=0.0),
                            "fp32": fp32_norm or why is not None, "reason": "--fp32-norm" if fp32_norm else why}
    if why and not fp32_norm:
        record["fp32_norm"] = True
        console.print(f"[yellow]! {why}: GroupNorm statistics are kept in fp32 in the fp16 graph (as --fp32-norm "
                      "does), since TensorRT documents no fp32 accumulation for fp16 normalization[/]")
    write_audit_files(out, files, audit, after)
    if action is Action.STOP:
        anyway = ("--no-rescale or --fp32-norm export the fp16 graph for inspection only (no manifest), since "
                  f"activations above {FP16_MAX:g} never make an export") if doomed else \
            "To export the fp16 graph anyway and let verify judge it, pass --no-rescale or --fp32-norm"
        raise ExportError(f"fp16 export stopped: {audit.advice()}. {anyway}")
    return export_vae, record


def audit_command(loaded, components, json_path: Path | None, plot_path: Path | None,
                  rows: int = defaults.AUDIT_ROWS, with_rescale: bool = False, images: Path | None = None) -> None:
    """`vae-export audit`: the table and verdict, the JSON, and always the plot."""
    with stage("fp16 audit") as info:
        result = audit_model(loaded.vae, components, image_dir=images)
        info["detail"] = f"{len(result.layers)} layers, {len(result.calibration)} calibration inputs"
    after = None
    if with_rescale and decide(result) is Action.RESCALE:
        with stage("exact fp16 rescaling (a copy)"):
            after = rescale(loaded.vae, result).after
    print_audit(result, rows, after)
    if after is not None:
        console.print(f"After rescaling: max |activation| {after.worst.max_abs:.4g}, "
                      f"margin {after.margin_bits:+.1f} bits")
    extra = {"model": loaded.source, **({"after_rescale": after.as_dict()} if after is not None else {})}
    if json_path:
        write_json(json_path, result, extra)
        console.print(f"Wrote {json_path}")
    plot = plot_path or (json_path.with_suffix(".png") if json_path else Path(f"{loaded.name}-fp16-audit.png"))
    plot_audit(plot, result, after=after, target=ACT_TARGET)
    console.print(f"Wrote plot {plot.resolve()}", soft_wrap=True)
