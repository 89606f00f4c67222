"""`vae-export audit --model M`: is fp16 safe for this VAE, by how much, and what to do if not."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..components import parse_components


def _parser() -> argparse.ArgumentParser:
    from .loading import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog="vae-export audit",
        description="Run the fp32 model on calibration images and latents, record each layer's largest activation "
        "and each GroupNorm's largest squared deviation, and say whether fp16 overflows (65504) and what to do.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="as for vae-export: Hub id, folder, .safetensors or 'demo'")
    p.add_argument("--components", default="decoder,encoder", help="comma-separated: decoder,encoder (default both)")
    p.add_argument("--json", type=Path, default=None, help="write the per-layer figures and the verdict here")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of magnitude per layer (default: next to --json, else ./<model>-fp16-audit.png)")
    p.add_argument("--rows", type=int, default=12, help="table rows: the layers with the least margin (default 12)")
    p.add_argument("--rescale", action="store_true",
                   help="also rescale a copy and show the maxima after (what vae-export --precision fp16 would do)")
    p.add_argument("--subfolder", default=None, help="subfolder of a Hub repo holding the VAE (e.g. vae)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt weights (only trusted sources)")
    return p


def main(argv) -> int:
    args = _parser().parse_args(argv)
    from .audit import run_audit
    from .audit_report import print_audit, write_json
    from .calibration import calibration_inputs
    from .fp16_safety import rescale
    from .loading import load_vae
    from .plots import plot_audit
    from .progress import console, stage
    from .rescale import ACT_TARGET

    components = parse_components(args.components)
    with stage("load model") as info:
        loaded = load_vae(args.model, allow_pickle=args.allow_pickle, subfolder=args.subfolder)
        info["detail"] = f"{loaded.source['kind']}: {loaded.source['model']}"
    with stage("fp16 audit") as info:
        calibration = calibration_inputs(loaded.vae, components)
        result = run_audit(loaded.vae, components, calibration)
        info["detail"] = f"{len(result.layers)} layers, {len(result.calibration)} calibration inputs"
    after = None
    if args.rescale and not result.fp16_safe and result.rescale_possible:
        with stage("exact fp16 rescaling (a copy)"):
            after = rescale(loaded.vae, result, calibration).after
    print_audit(result, args.rows, after)
    if after is not None:
        console.print(f"After rescaling: max |activation| {after.worst.max_abs:.4g}, "
                      f"margin {after.margin_bits:+.1f} bits")
    extra = {"model": loaded.source, **({"after_rescale": after.as_dict()} if after is not None else {})}
    if args.json:
        write_json(args.json, result, extra)
        console.print(f"Wrote {args.json}")
    plot = args.plot or (args.json.with_suffix(".png") if args.json else Path(f"{loaded.name}-fp16-audit.png"))
    plot_audit(plot, result, after=after, target=ACT_TARGET)
    console.print(f"Wrote plot {plot.resolve()}", soft_wrap=True)
    return 0
