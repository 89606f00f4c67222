"""Export cost and CPU inference figures for the SDXL-architecture demo model.

    python benchmarks/bench_export.py [--precision fp16] [--latent 32] [--repeats 5]

Prints, side by side in one run:
  * export wall time and peak RSS, per component and for both (each in a fresh process,
    without the verify step, as `vae-export --no-verify` runs it);
  * decode/encode time through OrtVae vs a bare onnxruntime.InferenceSession on the same
    files and inputs (the wrapper's overhead), and PyTorch eager fp32 on the same shapes.
Timings are medians of interleaved repeats; this machine is noisy, so compare ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from trtvae.export.options import ExportOptions
from trtvae.export.run import run_export
t = time.perf_counter()
run_export(ExportOptions(model="demo", precision=sys.argv[1], out=sys.argv[2],
                         components=tuple(sys.argv[3].split(",")), verify=False))
wall = time.perf_counter() - t
from trtvae.export.progress import timings
stages = {title: s for title, s in timings}
onnx_s = sum(s for title, s in timings if title.startswith("export "))
print("RESULT " + json.dumps({"wall_s": wall, "onnx_s": onnx_s, "audit_s": stages.get("fp16 audit", 0.0),
                              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def export_in_child(precision: str, out: Path, components: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, precision, str(out), components],
                          capture_output=True, text=True, check=True)
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["process_s"] = time.perf_counter() - start  # includes Python and torch start-up
    return result


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16"])
    ap.add_argument("--latent", type=int, default=32, help="latent size for timing (32 → 256² image)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    work = Path(tempfile.mkdtemp(prefix="trtvae-bench-"))
    rows = []
    for comps in ("decoder", "encoder", "decoder,encoder"):
        r = export_in_child(args.precision, work / comps.replace(",", "_"), comps)
        rows.append((comps, r))
    t = Table(title=f"Export of the SDXL-architecture demo ({args.precision}, no verify), fresh process each")
    for c in ("components", "ONNX export s", "fp16 audit s", "run_export wall s", "peak RSS GB",
              "process s (incl. start-up)"):
        t.add_column(c, justify="right")
    for comps, r in rows:
        t.add_row(comps, f"{r['onnx_s']:.1f}", f"{r['audit_s']:.1f}", f"{r['wall_s']:.1f}",
                  f"{r['peak_rss_gb']:.2f}", f"{r['process_s']:.1f}")
    console.print(t)

    import numpy as np
    import onnxruntime as ort

    from trtvae import OrtVae
    from trtvae.export.loading import load_demo

    out = work / "decoder_encoder"
    vae = OrtVae.from_pretrained(out, providers=["CPUExecutionProvider"])
    ref = load_demo().vae
    n = args.latent
    z = torch.randn(1, 4, n, n)
    x = torch.rand(1, 3, 8 * n, 8 * n) * 2 - 1
    np_dtype = np.float16 if args.precision == "fp16" else np.float32
    sessions = {c: ort.InferenceSession(str(out / f"{c}.onnx"), providers=["CPUExecutionProvider"])
                for c in ("decoder", "encoder")}
    cases = {
        "decode": (lambda: vae.decode(z), lambda: sessions["decoder"].run(None, {"latent_sample": z.numpy().astype(np_dtype)}),
                   lambda: ref.decode(z)),
        "encode": (lambda: vae.encode(x), lambda: sessions["encoder"].run(None, {"sample": x.numpy().astype(np_dtype)}),
                   lambda: ref.encode(x)),
    }
    t = Table(title=f"CPU inference at latent {n}×{n} (image {8 * n}²), median of {args.repeats}, interleaved")
    for c in ("op", f"OrtVae {args.precision} s", f"bare ORT {args.precision} s", "wrapper overhead",
              "PyTorch eager fp32 s"):
        t.add_column(c, justify="right")
    with torch.no_grad():
        for op, (wrapped, bare, eager) in cases.items():
            wrapped(), bare(), eager()  # warm-up: session init and allocator growth
            times = {"w": [], "b": [], "e": []}
            for _ in range(args.repeats):
                times["w"].append(_timed(wrapped))
                times["b"].append(_timed(bare))
                times["e"].append(_timed(eager))
            w, b, e = (statistics.median(times[k]) for k in "wbe")
            t.add_row(op, f"{w:.3f}", f"{b:.3f}", f"{(w - b) / b * 100:+.1f}%", f"{e:.3f}")
    console.print(t)
    console.print(f"torch threads: {torch.get_num_threads()}, onnxruntime {ort.__version__}, work dir {work}")


if __name__ == "__main__":
    main()
