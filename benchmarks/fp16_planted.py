"""The planted-overflow figures of docs/fp16-safety.md and the README, from one run.

    python benchmarks/fp16_planted.py [--lowest 14] [--no-fp32-norm] [--keep DIR]

The SDXL-architecture demo (`--model demo`: seeded random weights) is fp16 safe. Planting
(tests/fp16/planting.py, shared with the tests) multiplies one named stretch of the residual
stream by 2^lowest in the decoder and 2^(lowest+1) in the encoder (exactly: the convs writing it
× 2^k, the norms reading it eps × 4^k, the conv ending it × 2^-k), so fp32 outputs stay
bit-identical and fp16 overflows, as in the original SDXL VAE. Then four fp16 exports, each
verified against PyTorch fp32 of the *original* demo weights on ONNX Runtime (CPU):

  1. demo                                   (the audit finds nothing; rescaling is a no-op)
  2. demo + planted overflow, --no-rescale  (verify fails on NaN/inf; no manifest)
  3. demo + planted overflow, rescaled      (automatic)
  4. demo + planted overflow, rescaled + --fp32-norm, decoder only  (skip with --no-fp32-norm)

Printed per row: largest |activation| and its layer, margin in bits, largest GroupNorm
(x-μ)², largest attention score, rescaled groups, fp32 change, and fp16 rel L2 per verified
tensor (min – max over the verify step's shapes). Several minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _quiet(fn, *args, **kwargs):
    """Run an export with its tables and spinners swallowed; return (result or exception, seconds)."""
    from trtvae.export.progress import console

    start = time.perf_counter()
    buffer = io.StringIO()
    old = console.file
    console.file = buffer
    try:
        with contextlib.redirect_stdout(buffer):
            result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the planted --no-rescale export is expected to fail verify
        result = e
    finally:
        console.file = old
    return result, time.perf_counter() - start


def _audit_figures(report: dict) -> dict:
    layers = report["layers"]
    acts = [x for x in layers if x["kind"] != "scores"]
    worst = max(acts, key=lambda x: x["max_abs"])
    norms = [x["norm_sq_max"] for x in layers if "norm_sq_max" in x]
    scores = [x["max_abs"] for x in layers if x["kind"] == "scores"]
    return {"max_abs": worst["max_abs"], "layer": worst["name"], "margin_bits": report["margin_bits"],
            "norm_sq_max": max(norms) if norms else None, "scores_max": max(scores) if scores else None}


def _verify_ranges(checks: list) -> str:
    by_tensor: dict = {}
    for c in checks:
        by_tensor.setdefault(c["tensor"], []).append(c["rel_l2"])
    return "; ".join(f"{t} {min(v):.3g} – {max(v):.3g}" if len(v) > 1 else f"{t} {v[0]:.3g}"
                     for t, v in by_tensor.items())


def _run_onnx(onnx_path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy().astype(np.float16)})[0]


def _fmt(x, spec=".4g") -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lowest", type=int, default=14,
                    help="the decoder's stream is planted × 2^lowest, the encoder's × 2^(lowest+1) (default 14)")
    ap.add_argument("--no-fp32-norm", action="store_true", help="skip row 4 (rescaled + --fp32-norm, decoder)")
    ap.add_argument("--keep", type=Path, default=None, help="write the planted model and the exports here")
    args = ap.parse_args()

    import onnxruntime

    from trtvae.export.loading import load_demo
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export
    from trtvae.export.progress import timings
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fp16"))
    from planting import plant_overflow
    from trtvae.export.verify import sample_images, sample_latents
    from trtvae.metrics import compare

    work = args.keep or Path(tempfile.mkdtemp(prefix="fp16_planted_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), "
          f"{torch.get_num_threads()} threads; files in {work}")

    demo = load_demo().vae
    start = time.perf_counter()
    planted = plant_overflow(demo, args.lowest)
    # One decoder and one encoder input as the verify step makes them (its smallest shapes).
    z = sample_latents(demo.config, 1, 8, 8, seed=0)
    x = sample_images(1, 3, 64, 64, seed=1)
    with torch.no_grad():
        ref_dec = demo.decode(z).sample
        ref_enc = demo.quant_conv(demo.encoder(x))
        same = (torch.equal(planted.decode(z).sample, ref_dec)
                and torch.equal(planted.quant_conv(planted.encoder(x)), ref_enc))
    planted_dir = work / "planted_vae"
    planted.save_pretrained(planted_dir)
    del planted
    print(f"planted 2^{args.lowest} (decoder), 2^{args.lowest + 1} (encoder) in {time.perf_counter() - start:.1f} s; "
          f"fp32 outputs bit-identical to the demo's (torch.equal; decode 1x4x8x8, encode 1x3x64x64): {same}")

    rows = [("demo", dict(model="demo")),
            ("demo + planted overflow, --no-rescale", dict(model=str(planted_dir), rescale=False)),
            ("demo + planted overflow, rescaled (automatic)", dict(model=str(planted_dir)))]
    if not args.no_fp32_norm:
        rows.append(("demo + planted overflow, rescaled + --fp32-norm (decoder)",
                     dict(model=str(planted_dir), fp32_norm=True, components=("decoder",))))

    for i, (label, kw) in enumerate(rows, 1):
        out = work / f"export_{i}"
        timings.clear()
        result, seconds = _quiet(run_export, ExportOptions(precision="fp16", out=out, engines="skip", **kw))
        stages = dict(timings)
        # A failed export leaves --out untouched and keeps its files in <out>.inspect.
        files = out if (out / "manifest.json").exists() else out.parent / f"{out.name}.inspect"
        report = json.loads((files / "fp16_audit.json").read_text())
        before = _audit_figures(report)
        shown = _audit_figures(report["after_rescale"]) if "after_rescale" in report else before
        print(f"\n[{i}] {label}")
        if shown is not before:
            print(f"  before rescaling: max |activation| {before['max_abs']:.4g} ({before['layer']}), "
                  f"margin {before['margin_bits']:+.1f} bits, "
                  f"GroupNorm (x-μ)² max {_fmt(before['norm_sq_max'], '.3g')}")
        print(f"  max |activation| {shown['max_abs']:.4g} ({shown['layer']}), margin {shown['margin_bits']:+.1f} bits, "
              f"GroupNorm (x-μ)² max {_fmt(shown['norm_sq_max'], '.3g')}, largest attention score "
              f"{_fmt(shown['scores_max'], '.3g')}")
        manifest_path = out / "manifest.json"
        if manifest_path.exists():
            safety = json.loads(manifest_path.read_text())
            rescale = safety["fp16_safety"]["rescale"]
            groups = len(rescale.get("exponents", {}))
            change = rescale.get("fp32_rel_l2_vs_original")
            change = "—" if change is None else "0.0 (bit-identical)" if change == 0 else f"{change:.3g}"
            print(f"  rescaled groups {groups}, fp32 change (rel L2) {change}, "
                  f"fp32-norm {safety['fp16_safety']['fp32_norm']}")
            print(f"  fp16 rel L2 on ORT vs PyTorch fp32: {_verify_ranges(safety['verify']['checks'])}")
        else:
            print(f"  no manifest: {type(result).__name__}: {result}")
            for name, inp, ref in (("decoder", z, ref_dec), ("encoder moments", x, ref_enc)):
                y = _run_onnx(files / f"{name.split()[0]}.onnx", inp)
                stats = compare(y, ref)
                print(f"  {name} at {'x'.join(map(str, inp.shape))}: {stats.nonfinite} of {y.size} values NaN/inf "
                      f"({stats.nonfinite / y.size:.1%}), rel L2 {stats.rel_l2:.3g}")
        print(f"  time: export {seconds:.0f} s (fp16 audit {stages.get('fp16 audit', 0):.0f} s, "
              f"rescaling {stages.get('exact fp16 rescaling', 0):.0f} s, "
              f"verify {stages.get('verify vs PyTorch fp32', 0):.0f} s)")


if __name__ == "__main__":
    main()
