"""How an audit is shown: a rich table of the layers closest to fp16's limit, a verdict line, JSON, PNG."""
from __future__ import annotations

import json
import math

from rich.table import Table

from ..manifest import atomic_path
from .audit import FP16_MAX, HEADROOM_BITS, AuditResult
from .progress import console


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
    return (f"{head}: margin {_fmt_bits(result.margin_bits)} bits{where}{norm}. "
            f"Recommendation: {result.recommendation} — {result.advice()}")


def print_audit(result: AuditResult, rows: int = 12, after: AuditResult | None = None) -> None:
    console.print(audit_table(result, rows, after))
    line = norm_line(result)
    if line:
        console.print(line)
    console.print(verdict_line(result))


def write_json(path, result: AuditResult, extra: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**result.as_dict(), **(extra or {})}, indent=2) + "\n")
