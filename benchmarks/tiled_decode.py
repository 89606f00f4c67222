"""Tiled decode at 1024², 2048², 4096²: exact vs blend vs untiled, in one run, on OrtVae (ONNX Runtime CPU).

Each case runs in its own process, so its peak memory (VmHWM, reset after a warm-up decode of one
tile) is its own. Every output is compared with the untiled decode where that fits in memory
(`--untiled-max`), else with diffusers' untiled PyTorch decode (`--torch-max`), else with the exact
decode (said in the table). A PNG shows the amplified
difference to the reference for blend and exact.

    python benchmarks/tiled_decode.py                 # SDXL layout, channels /8: minutes on 2 CPU cores
    python benchmarks/tiled_decode.py --sizes 1024    # one size
    python benchmarks/tiled_decode.py --width 1 --sizes 1024   # the real SDXL VAE width

Weights are random (seeded); timing and memory do not depend on them, accuracy hardly.
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

MODES = ("untiled", "exact", "blend")
CHILD_MODES = MODES + ("diffusers",)  # diffusers: PyTorch fp32 eager, untiled
DOCS = Path(__file__).resolve().parent.parent / "docs"


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

    from trtvae import OrtVae

    workdir = Path(args.workdir)
    latent, tile_latent = args.size // 8, args.tile // 8
    if args.mode == "diffusers":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(workdir / "model").eval().requires_grad_(False)
    else:
        vae = OrtVae.from_pretrained(workdir / "export", providers=["CPUExecutionProvider"])
        vae.tile_sample_min_size, vae.tile_latent_min_size = args.tile, tile_latent
        if args.mode != "untiled":
            vae.enable_tiling(mode=args.mode)
    channels = vae.config["latent_channels"]
    z = torch.randn(1, channels, latent, latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decode(z[:, :, :tile_latent, :tile_latent])  # sessions, allocators, first-run costs
        baseline = _rss_mb("VmRSS")
        exact_peak = _reset_peak()
        walls, cpus = [], []
        for _ in range(args.repeats):  # the fastest of a few: other work on a shared machine only adds time
            start, cpu = time.perf_counter(), time.process_time()
            image = vae.decode(z).sample
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        peak = _rss_mb("VmHWM")
    np.save(workdir / f"{args.mode}_{args.size}.npy", image.float().numpy())
    print(json.dumps({"seconds": min(walls), "cpu_seconds": min(cpus), "walls": walls, "baseline_mb": baseline,
                      "peak_mb": peak, "exact_peak": exact_peak, "threads": torch.get_num_threads()}))


def run_case(args, mode: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--size", str(size), "--tile", str(args.tile),
           "--workdir", str(args.workdir), "--repeats", str(args.repeats if size <= args.repeat_max else 1)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} at {size}² failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def diff_png(path: Path, ref: np.ndarray, outputs: dict, gain: float) -> None:
    """Side by side: |output − reference| × gain for each mode, as 8-bit RGB."""
    from PIL import Image, ImageDraw

    panels = []
    for mode, out in outputs.items():
        d = np.abs(out[0] - ref[0]).transpose(1, 2, 0) / 2 * 255 * gain  # [-1, 1] images: 2 is full scale
        img = Image.fromarray(np.clip(d, 0, 255).astype(np.uint8))
        ImageDraw.Draw(img).text((8, 8), f"{mode}: |diff| x{gain:g}", fill=(255, 255, 0))
        panels.append(img)
    w, h = panels[0].size
    sheet = Image.new("RGB", (w * len(panels), h))
    for i, p in enumerate(panels):
        sheet.paste(p, (i * w, 0))
    sheet.thumbnail((1024, 512))  # two 512² panels: seams stay visible, the file stays small
    sheet.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="image sides in pixels")
    p.add_argument("--tile", type=int, default=512, help="tile_sample_min_size in pixels (latent tile = /8)")
    p.add_argument("--width", type=int, default=8, help="divide the SDXL VAE's channel widths by this (1 = SDXL)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--untiled-max", type=int, default=1024,
                   help="largest side decoded untiled by ONNX Runtime (its attention scores alone are (side/8)^4 · 4 "
                        "bytes: 17 GB at 2048²)")
    p.add_argument("--torch-max", type=int, default=2048,
                   help="largest side decoded by diffusers' PyTorch model (its CPU attention is memory-efficient, so "
                        "it fits where the untiled ONNX graph does not)")
    p.add_argument("--repeats", type=int, default=3, help="decodes per case; the fastest is reported")
    p.add_argument("--repeat-max", type=int, default=1024, help="larger sides are decoded once")
    p.add_argument("--png", type=Path, default=DOCS / "tiled-decode-difference.png")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)

    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiled_decode_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    from trtvae.metrics import compare

    config = prepare(args.workdir, args.width, args.precision)
    print(f"\nmodel: SDXL VAE layout (4 blocks, factor 8, mid-block attention), block_out_channels "
          f"{config['block_out_channels']}, layers_per_block {config['layers_per_block']}, random weights; "
          f"ONNX {args.precision}; tiles {args.tile} px / {args.tile // 8} latent (blend: overlap 0.25); "
          f"{os.cpu_count()} CPUs; workdir {args.workdir}\n")

    rows, png_done = [], False
    for size in args.sizes:
        limit = {"untiled": args.untiled_max, "diffusers": args.torch_max}
        modes = [m for m in CHILD_MODES if size <= limit.get(m, size)]
        results = {m: run_case(args, m, size) for m in modes}
        outputs = {m: np.load(args.workdir / f"{m}_{size}.npy") for m in modes}
        ref_name = next(m for m in ("untiled", "diffusers", "exact") if m in outputs)
        ref = outputs[ref_name]
        torch_ref = outputs.get("diffusers")
        for mode, r in results.items():
            stats = compare(outputs[mode], ref, image=True) if mode != ref_name else None
            vs_torch = compare(outputs[mode], torch_ref).rel_l2 if torch_ref is not None and mode != "diffusers" \
                else None
            rows.append((f"{size}²", mode, ref_name, r, stats, vs_torch))
            with open(args.workdir / "results.jsonl", "a") as f:
                f.write(json.dumps({"size": size, "mode": mode, "vs": ref_name, **r, "vs_torch_rel_l2": vs_torch,
                                    **({"psnr_db": stats.psnr_db, "rel_l2": stats.rel_l2} if stats else {})}) + "\n")
        if not png_done:
            diff_png(args.png, ref, {m: outputs[m] for m in ("blend", "exact") if m != ref_name}, gain=10)
            png_done = True
        for m in modes:
            (args.workdir / f"{m}_{size}.npy").unlink()
        base = results.get("untiled")
        print(f"{size}²: " + ", ".join(f"{m} {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU) / {r['peak_mb']:.0f} MB"
                                      for m, r in results.items())
              + (f" (exact/untiled time {results['exact']['seconds'] / base['seconds']:.2f}×, peak "
                 f"{results['exact']['peak_mb'] / base['peak_mb']:.2f}×)" if base else ""), flush=True)

    header = ("image", "mode", "vs", "PSNR dB", "rel L2", "rel L2 vs PyTorch fp32", "time s", "CPU s", "peak RSS MB",
              "decode Δ MB")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for img, mode, ref_name, r, stats, vs_torch in rows:
        psnr = "" if stats is None else f"{stats.psnr_db:.1f}"
        rel = "(reference)" if stats is None else f"{stats.rel_l2:.1e}"
        torch_rel = "" if vs_torch is None else f"{vs_torch:.1e}"
        print(f"| {img} | {mode} | {ref_name} | {psnr} | {rel} | {torch_rel} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} |")
    print(f"\ntime: the fastest of {args.repeats} decodes up to {args.repeat_max}², one decode above; CPU s: "
          f"process CPU time of that decode (both threads; less sensitive to other load than wall time). "
          f"decode Δ: peak RSS during the decode minus RSS just before it (after a one-tile warm-up). "
          f"Difference PNG: {args.png}")
    if not all(r["exact_peak"] for _, _, _, r, _, _ in rows):
        print("note: /proc/self/clear_refs was not writable: peaks include model loading.")


if __name__ == "__main__":
    main()
