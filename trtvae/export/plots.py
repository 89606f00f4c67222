"""PNG pictures for people: the verify step's decoder grid, and the helpers the fp16 audit's plot shares."""
from __future__ import annotations

import math

import numpy as np



def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on export machines; never open a window
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path) -> None:
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)


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
    plt = pyplot()
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
    save_png(fig, path)
    plt.close(fig)
