"""For a source that declares `force_upcast: true`: run the fp16 export on the audit's own calibration too.

Verify's inputs are random latents and smooth images; the calibration (patterns, their latents,
the user's `--images`) is what drove the audit's maxima. A model whose authors flagged fp16 as
unsafe must not pass on the gentle inputs while overflowing on the hard ones.
"""
from __future__ import annotations

from ...components import DECODER
from ...errors import VerificationError
from ...metrics import REL_L2_THRESHOLD, compare, passes
from ..progress import console, stage
from ..verify import reference
from .calibration import calibration_inputs


def verify_on_calibration(vae, out, manifest: dict, components, image_dir=None) -> dict:
    """The manifest's record; raises VerificationError naming the first calibration input that fails."""
    from ...runtime.ort import OrtVae

    runtime = OrtVae(out, manifest, providers=["CPUExecutionProvider"])
    rows = []
    with stage("verify fp16 on the audit's calibration") as info:
        for component, inputs in calibration_inputs(vae, components, image_dir=image_dir).items():
            for label, x in inputs:
                ref = reference(vae, component, x)
                if component == DECODER:
                    stats = compare(runtime.decode(x).sample, ref, image=True)
                else:
                    stats = compare(runtime.encode(x).latent_dist.mean, ref.mean)
                rows.append({"component": component, "input": label, "shape": list(x.shape), **stats.as_dict(),
                             "ok": passes(stats, "fp16")})
        info["detail"] = f"{len(rows)} inputs"
    worst = max(rows, key=lambda r: (not r["ok"], r["rel_l2"]))
    console.print(f"fp16 on the calibration (the source declares force_upcast: true): worst rel L2 "
                  f"{worst['rel_l2']:.2e} ({worst['component']}, {worst['input']}), "
                  f"{sum(r['nonfinite'] for r in rows)} NaN/inf")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        f = failed[0]
        raise VerificationError(
            f"the fp16 {f['component']} fails on the audit's calibration input {f['input']!r}: rel L2 "
            f"{f['rel_l2']:.2e} (threshold {REL_L2_THRESHOLD['fp16']:g}), {f['nonfinite']} NaN/inf; the source "
            f"declares force_upcast: true and the random verify inputs did not show it. No manifest was written")
    return {"passed": True, "threshold_rel_l2": REL_L2_THRESHOLD["fp16"], "checks": rows}
