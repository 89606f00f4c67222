"""PNG pictures for people: the audit's magnitudes per layer, and the verify step's decoder grid."""
from __future__ import annotations

import math

import numpy as np

from .audit import FP16_MAX


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on export machines; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    from ..manifest import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)


def plot_audit(path, result, after=None, title: str | None = None, target: float | None = None) -> None:
    """Largest |activation| per layer (execution order), log scale, one panel per component.

    `after`: an audit of the rescaled model, drawn over the first for comparison.
    """
    plt = _pyplot()
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
    _save(fig, path)
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


def _display(img) -> tuple:
    """[C, H, W] in [-1, 1] → [H, W, 3] in [0, 1]; NaN/inf drawn as magenta, counted."""
    a = np.asarray(img, dtype=np.float64)
    bad = ~np.isfinite(a).all(axis=0)
    a = (np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0), -1, 1) + 1) / 2
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    a = a.transpose(1, 2, 0).copy()
    a[bad] = (1.0, 0.0, 1.0)
    return a, int(bad.sum())


def amplification(diff: np.ndarray) -> float:
    """A 1-2-5 factor that maps the 99.9th percentile of |difference| to about full scale."""
    finite = diff[np.isfinite(diff)]
    p = float(np.percentile(finite, 99.9)) if finite.size else 0.0
    if p <= 0:
        return 1.0
    raw = 1.0 / p
    decade = 10 ** math.floor(math.log10(raw))
    factor = max(s * decade for s in (1, 2, 5) if s * decade <= raw) if raw >= 1 else 1.0
    return float(min(max(factor, 1.0), 1e4))


def plot_verify_grid(path, rows: list, title: str = "decoder: PyTorch fp32 vs exported") -> None:
    """rows: [(label, reference [C,H,W], result [C,H,W])]; columns: reference, result, |difference| × k."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), dpi=80, squeeze=False)
    for (label, ref, res), ax in zip(rows, axes):
        ref = np.asarray(ref, dtype=np.float64)
        res = np.asarray(res, dtype=np.float64)
        ref_img, _ = _display(ref)
        res_img, bad = _display(res)
        nonfinite = ~np.isfinite(res).all(axis=0)
        diff = np.abs(np.clip(np.nan_to_num(res), -1, 1) - np.clip(ref, -1, 1)).max(axis=0)
        diff[nonfinite] = np.nan
        k = amplification(diff)
        ax[0].imshow(ref_img)
        ax[0].set_title(f"reference  {label}", fontsize=8)
        ax[1].imshow(res_img)
        ax[1].set_title("result" + (f" ({bad} NaN/inf px, magenta)" if bad else ""), fontsize=8)
        shown = plt.get_cmap("magma")(np.clip(np.nan_to_num(diff) * k, 0, 1))[..., :3]
        shown[nonfinite] = (1.0, 0.0, 1.0)
        ax[2].imshow(shown)
        finite = diff[np.isfinite(diff)]
        worst = f"max {finite.max():.3g}" if finite.size else "all NaN/inf"
        ax[2].set_title(f"|difference| x{k:g} ({worst})", fontsize=8)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
