"""How an audit is shown: a rich table of the layers closest to fp16's limit, a verdict line, JSON, PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from rich.table import Table

from ...files import atomic_path
from ..plots import pyplot, save_png
from ..progress import console
from .audit import AuditResult
from .decide import needs_fp32_norm
from .limits import ACT_TARGET, FP16_MAX, HEADROOM_BITS

AUDIT_JSON = "fp16_audit.json"
AUDIT_PNG = "fp16_audit.png"


def _fmt_bits(b: float) -> str:
    return "∞" if math.isinf(b) and b > 0 else f"{b:+.1f}"


def audit_table(result: AuditResult, rows: int = 12, after: AuditResult | None = None) -> Table:
    """The `rows` layers with the least margin; with `after`, their maxima after rescaling too.

    The (x-μ)² column is shown only when a GroupNorm is among those rows; `norm_line` gives
    the largest one in any case.
    """
    after_by_name = {s.name: s for s in after.layers} if after is not None else {}
    shown = sorted(result.layers, key=lambda s: s.margin_bits)[:rows]
    with_norms = any(s.norm_sq_max is not None for s in shown)
    t = Table(title=f"Largest activations vs fp16's {FP16_MAX:g} (margin in bits = log2(65504 / max))")
    columns = ["layer", "kind", "max |x|", "margin bits"] + (["(x-μ)² max"] if with_norms else []) + ["rescalable"]
    for col in columns:
        t.add_column(col, justify="left" if col in ("layer", "kind") else "right", no_wrap=col != "layer")
    if after is not None:
        t.add_column("after rescale", justify="right", no_wrap=True)
    for s in shown:
        colour = "red" if s.margin_bits < 0 else "yellow" if s.margin_bits < HEADROOM_BITS else ""
        margin = f"[{colour}]{_fmt_bits(s.margin_bits)}[/]" if colour else _fmt_bits(s.margin_bits)
        cells = [s.name, s.kind, f"{s.max_abs:.4g}", margin]
        if with_norms:
            cells.append("" if s.norm_sq_max is None else f"{s.norm_sq_max:.3g}")
        cells.append("yes" if s.scale_group is not None else "no")
        if after is not None:
            a = after_by_name.get(s.name)
            cells.append("" if a is None else f"{a.max_abs:.4g}")
        t.add_row(*cells)
    return t


def norm_line(result: AuditResult) -> str | None:
    """The largest squared deviation any GroupNorm's variance sees; None without GroupNorms."""
    norms = [s for s in result.layers if s.norm_sq_max is not None]
    if not norms:
        return None
    worst = max(norms, key=lambda s: s.norm_sq_max)
    return (f"GroupNorm statistics: largest (x-μ)² {worst.norm_sq_max:.3g} at {worst.name} "
            f"(margin {_fmt_bits(worst.norm_margin_bits)} bits if kept in fp16)")


def verdict_line(result: AuditResult) -> str:
    worst = result.worst
    where = f" at {worst.name} (max {worst.max_abs:.4g})" if worst else ""
    head = "[green]fp16 safe[/]" if result.fp16_safe else "[red]fp16 UNSAFE[/]"
    norm = ("" if result.norm_stats_fp16_safe else
            f"; GroupNorm statistics exceed fp16 by {-result.norm_margin_bits:.1f} bits if kept in fp16")
    var = needs_fp32_norm(result)
    if var:  # judged, not only recorded: the export acts on it
        norm += f"; {var}: an fp16 export keeps GroupNorm statistics in fp32 automatically"
    return (f"{head}: margin {_fmt_bits(result.margin_bits)} bits{where}{norm}. "
            f"Recommendation: {result.recommendation} — {result.advice()}{_force_upcast_note(result)}")


def _force_upcast_note(result: AuditResult) -> str:
    if not result.declares_force_upcast:
        return ""
    if result.fp16_safe:
        return (". The model's config declares force_upcast: true (its authors run it in fp32); "
                "the audit found fp16 safe on its calibration, and verify fails on any NaN or inf")
    return ". The model's config declares force_upcast: true (its authors run it in fp32), as the audit confirms"


def print_audit(result: AuditResult, rows: int = 12, after: AuditResult | None = None) -> None:
    console.print(audit_table(result, rows, after))
    line = norm_line(result)
    if line:
        console.print(line)
    console.print(verdict_line(result))


def write_json(path, result: AuditResult, extra: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**result.as_dict(), **(extra or {})}, indent=2) + "\n")


def plot_audit(path, result, after=None, title: str | None = None, target: float | None = None) -> None:
    """Largest |activation| per layer (execution order), log scale, one panel per component.

    `after`: an audit of the rescaled model, drawn over the first for comparison.
    """
    plt = pyplot()
    components = list(dict.fromkeys(s.component for s in result.layers))
    fig, axes = plt.subplots(len(components), 1, figsize=(12, 1 + 3.6 * len(components)), dpi=80, squeeze=False)
    for ax, component in zip(axes[:, 0], components):
        _audit_panel(ax, result, component, "before rescaling" if after is not None else "fp32 model", "tab:red")
        if after is not None:
            _audit_panel(ax, after, component, "after rescaling", "tab:blue")
        ax.axhline(FP16_MAX, color="black", lw=1.2)
        ax.text(0, FP16_MAX * 1.3, f"fp16 max {FP16_MAX:g}", fontsize=8, va="bottom")
        if target:
            ax.axhline(target, color="grey", lw=0.8, ls="--")
            ax.text(0, target * 1.3, f"rescale target 2^{int(math.log2(target))}", fontsize=8, color="grey")
        ax.set_yscale("log")
        ax.set_ylim(top=max(ax.get_ylim()[1], FP16_MAX * 8))
        ax.set_ylabel("max |activation|")
        ax.set_title(component, fontsize=10, loc="left")
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("layer (execution order)")
    fig.suptitle(title or _audit_title(result, after), fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _audit_title(result, after) -> str:
    def verdict(r):
        return f"{'fp16 safe' if r.fp16_safe else 'fp16 UNSAFE'}, margin {r.margin_bits:+.1f} bits"

    text = f"fp16 audit: {verdict(result)}"
    return text + (f"; after rescaling: {verdict(after)}" if after is not None else "")


def _audit_panel(ax, result, component, label, colour):
    layers = [s for s in result.layers if s.component == component]
    x = np.arange(len(layers))
    y = np.array([max(s.max_abs, 1e-12) for s in layers])
    ax.plot(x, y, ".-", color=colour, lw=0.6, ms=3, label=f"{label}: outputs")
    norms = [(i, s.norm_sq_max) for i, s in enumerate(layers) if s.norm_sq_max]
    if norms:
        ni, nv = zip(*norms)
        ax.plot(ni, nv, "x", color=colour, ms=4, alpha=0.6, label=f"{label}: GroupNorm (x-mean)^2")
    worst = int(np.argmax(y))
    ax.annotate(layers[worst].name, (worst, y[worst]), fontsize=7, color=colour,
                xytext=(5, 4), textcoords="offset points")


def write_audit_files(out, files: dict, audit: AuditResult, after: AuditResult | None) -> None:
    """The export's audit record: JSON always (where `files` names it), the plot where overflow was found."""
    if not files:
        return
    write_json(Path(out) / files["json"], audit, {"after_rescale": after.as_dict()} if after is not None else None)
    if "plot" in files:
        plot_audit(Path(out) / files["plot"], audit, after=after, target=ACT_TARGET)
