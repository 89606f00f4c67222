"""Tiled decode at 2048² and 4096²: OrtVae vs diffusers' own AutoencoderKL tiled decode, same weights and tiles.

Each case runs in its own process, so its peak memory (VmHWM, reset after a warm-up decode of one tile)
is its own. The outputs are compared at the end: same tiling, so they should agree to fp32 precision.

    python benchmarks/tiled_decode.py               # SDXL layout, channels /8: minutes on 2 CPU cores
    python benchmarks/tiled_decode.py --quick       # 2048² only
    python benchmarks/tiled_decode.py --width 1     # the real SDXL VAE width: about an hour per case on 2 cores

Weights are random (`load_demo`-style, seeded); timing and memory do not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _model_config(width_divisor: int) -> dict:
    from trtvae.export.families import family_config

    config = family_config("sdxl")
    if width_divisor > 1:
        channels = [c // width_divisor for c in config["block_out_channels"]]
        config.update(block_out_channels=channels, norm_num_groups=min(32, channels[0] // 2))
    return config


def prepare(workdir: Path, width_divisor: int, precision: str) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    config = _model_config(width_divisor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL.from_config(config).save_pretrained(workdir / "model")
    run_export(ExportOptions(model=str(workdir / "model"), precision=precision, out=workdir / "export",
                             components=("decoder",), verify=False))
    return config


def _reset_peak() -> bool:
    try:  # Linux ≥ 4.0: writing 5 resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    import torch

    workdir = Path(args.workdir)
    latent = args.size // 8
    tile_latent = args.tile // 8
    if args.backend == "onnxruntime":
        from trtvae import OrtVae

        vae = OrtVae.from_pretrained(workdir / "export", providers=["CPUExecutionProvider"])
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(workdir / "model").eval().requires_grad_(False)
    vae.tile_sample_min_size, vae.tile_latent_min_size = args.tile, tile_latent
    vae.enable_tiling()
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decode(z[:, :, :tile_latent, :tile_latent])  # sessions, allocators, first-run costs
        baseline = _rss_mb("VmRSS")
        exact_peak = _reset_peak()
        start = time.perf_counter()
        image = vae.decode(z).sample
        seconds = time.perf_counter() - start
        peak = _rss_mb("VmHWM")
    np.save(workdir / f"{args.backend}_{args.size}.npy", image.float().numpy())
    print(json.dumps({"seconds": seconds, "baseline_mb": baseline, "peak_mb": peak, "exact_peak": exact_peak,
                      "threads": torch.get_num_threads()}))


def run_case(args, backend: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--size", str(size), "--tile", str(args.tile),
           "--workdir", str(args.workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{backend} at {size}² failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiles_per_side(size: int, tile: int, overlap: float = 0.25) -> int:
    latent, tile_latent = size // 8, tile // 8
    return len(range(0, latent, int(tile_latent * (1 - overlap))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2048² only")
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="image sides in pixels")
    p.add_argument("--tile", type=int, default=512, help="tile_sample_min_size in pixels (latent tile = /8)")
    p.add_argument("--width", type=int, default=8, help="divide the SDXL VAE's channel widths by this (1 = SDXL)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", choices=["onnxruntime", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.backend = args.child
        return child(args)

    sizes = [2048] if args.quick else args.sizes
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiled_decode_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = prepare(args.workdir, args.width, args.precision)
    print(f"\nmodel: SDXL VAE layout (4 blocks, factor 8, mid-block attention), block_out_channels "
          f"{config['block_out_channels']}, layers_per_block {config['layers_per_block']}, random weights; "
          f"ONNX {args.precision}; tiles {args.tile} px / {args.tile // 8} latent, overlap 0.25; "
          f"{os.cpu_count()} CPUs; workdir {args.workdir}\n")

    rows, all_results = [], []
    for size in sizes:
        n = tiles_per_side(size, args.tile)
        results = {b: run_case(args, b, size) for b in ("onnxruntime", "diffusers")}
        all_results += results.values()
        ours = np.load(args.workdir / f"onnxruntime_{size}.npy").astype(np.float64)
        ref = np.load(args.workdir / f"diffusers_{size}.npy").astype(np.float64)
        rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
        output_mb = ref.size * 4 / 2**20
        for backend, r in results.items():
            rows.append((f"{size}²", f"{n}×{n}", backend, r["seconds"], r["peak_mb"], r["peak_mb"] - r["baseline_mb"],
                         output_mb, rel if backend == "onnxruntime" else None))
        for b in results:
            (args.workdir / f"{b}_{size}.npy").unlink()

    header = ("image", "tiles", "backend", "time s", "peak RSS MB", "decode Δ MB", "output MB", "rel L2 vs diffusers")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for img, tiles, backend, secs, peak, delta, out_mb, rel in rows:
        rel_s = "" if rel is None else f"{rel:.1e}"
        print(f"| {img} | {tiles} | {backend} | {secs:.1f} | {peak:.0f} | {delta:.0f} | {out_mb:.0f} | {rel_s} |")
    print("\ndecode Δ: peak RSS during the decode minus RSS just before it (after a one-tile warm-up).")
    if not all(r["exact_peak"] for r in all_results):
        print("note: /proc/self/clear_refs was not writable: peaks include model loading.")


if __name__ == "__main__":
    main()
