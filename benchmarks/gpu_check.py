"""End-to-end check on a GPU machine: export, engine build, verify, then decode/encode timings per backend.

    python benchmarks/gpu_check.py                      # demo model, fp16, 512²/1024²/1536²
    python benchmarks/gpu_check.py --model madebyollin/sdxl-vae-fp16-fix --report docs/gpu-check.md
    python benchmarks/gpu_check.py --quick              # correctness of every runtime path, a few minutes

--quick (benchmarks/gpu_quick.py): exports and builds the tiny and the demo model at one small profile (segment
plans included), runs every runtime path once (decode, encode, blend and exact tiling, slicing, batch split,
8 threads) and prints a pass/fail table against PyTorch fp32 (relative L2 within the fp16 threshold; exact
tiling also against the untiled engine on the same input). Without TensorRT it still runs the PyTorch and ONNX
Runtime CUDA rows and says TensorRT is missing. Exit 0 when every row that ran passed, 1 when one failed,
2 when nothing could be checked (no GPU).

Backends, side by side in one run: diffusers' PyTorch eager fp16, torch.compile of the same, ONNX Runtime CUDA
(OrtVae), TensorRT (TRTVae) with the dynamic 512–1536 engine, and a static 1024² engine.
A backend that cannot run here gets a row saying why; nothing is skipped silently.
Times are medians of CUDA-event-timed repeats after warm-up, batch 1.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

from gpu_quick import QUICK_MODELS, quick  # beside this script: --quick



def cuda_ms(fn, repeats: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for mod in ("diffusers", "onnxruntime", "tensorrt", "polygraphy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # missing, or the native libraries behind it are
            env[mod] = f"unavailable ({type(e).__name__})"
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return env


def tiled_rows(rows: list, vae, dynamic: Path, trt_reason, repeats: int) -> None:
    """Decode beyond the engine's 1536 max: TRTVae tiles automatically; diffusers' tiled decode alongside.

    Peak memory is torch's allocator peak for the call (TensorRT's context memory comes from torch too).
    """
    import torch

    backends = {"diffusers tiled decode fp16": lambda: (vae.enable_tiling(), lambda z: vae.decode(z).sample)[1]}
    if not trt_reason:
        def trt_tiled():
            from trtvae import TRTVae

            t = TRTVae.from_pretrained(dynamic)
            return lambda z: t.decode(z).sample

        backends["TensorRT fp16 dynamic, auto-tiled"] = trt_tiled
    else:
        rows.append(("TensorRT fp16 dynamic, auto-tiled", "decode", "2048²/4096²", None, trt_reason))
    for name, make in backends.items():
        try:
            fn = make()
        except Exception as e:
            rows.append((name, "decode", "-", None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            continue
        for size in (2048, 4096):
            z = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=torch.float16)
            try:
                torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    ms = cuda_ms(lambda: fn(z), max(3, repeats // 5), warmup=1)
                peak = torch.cuda.max_memory_allocated() / 2**30
                rows.append((name, "decode", size, ms, f"peak {peak:.1f} GiB"))
            except Exception as e:
                rows.append((name, "decode", size, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            finally:
                torch.cuda.empty_cache()
    vae.disable_tiling()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="correctness of every runtime path on the tiny and demo model at one small profile")
    ap.add_argument("--models", default=",".join(QUICK_MODELS), help="--quick: which of %(default)s")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="--quick: cpu checks the harness itself (PyTorch and ONNX Runtime CPU rows, no TensorRT)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", type=Path, default=Path("engines/gpu-check"))
    ap.add_argument("--sizes", default="512,1024,1536", help="image sides in pixels")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-export", action="store_true", help="reuse engines already in --out")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes)")
    ap.add_argument("--report", type=Path, default=None, help="also write the results as Markdown here")
    args = ap.parse_args()

    import torch

    env = environment()
    print(json.dumps(env, indent=2))
    if args.quick:
        return quick(args)
    if not torch.cuda.is_available():
        print("No CUDA GPU visible to torch: nothing to measure here. Run this on a GPU machine.")
        return 1
    from trtvae.export.engine import engines_unavailable_reason
    from trtvae.export.loading import load_vae
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    sizes = [int(s) for s in args.sizes.split(",")]
    trt_reason = engines_unavailable_reason()
    dynamic, static = args.out / "dynamic", args.out / "static1024"
    stages = {}
    if not args.skip_export:
        t = time.perf_counter()
        run_export(ExportOptions(model=args.model, precision="fp16", out=dynamic, engines="auto",
                                 batch="1-4", resolution=f"{min(sizes)}-{max(sizes)}", opt=1024))
        stages["export + build + verify (dynamic)"] = time.perf_counter() - t
        if trt_reason is None and 1024 in sizes:
            t = time.perf_counter()
            run_export(ExportOptions(model=args.model, precision="fp16", out=static, engines="required",
                                     batch="1", static="1024x1024", verify=False))
            stages["export + build (static 1024²)"] = time.perf_counter() - t

    vae = load_vae(args.model).vae.half().cuda().eval()
    rows = []  # (backend, op, size, ms or None, note)

    def measure(backend, make_fns):
        try:
            fns = make_fns()
        except Exception as e:
            rows.append((backend, "-", "-", None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            return
        for size in sizes:
            z = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=torch.float16)
            x = torch.rand(1, 3, size, size, device="cuda", dtype=torch.float16) * 2 - 1
            for op, fn, arg in (("decode", fns[0], z), ("encode", fns[1], x)):
                if fn is None:
                    continue
                try:
                    with torch.inference_mode():
                        ms = cuda_ms(lambda: fn(arg), args.repeats)
                    rows.append((backend, op, size, ms, ""))
                except Exception as e:
                    rows.append((backend, op, size, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                finally:
                    torch.cuda.empty_cache()

    measure("PyTorch eager fp16", lambda: (lambda z: vae.decode(z).sample, lambda x: vae.encode(x).latent_dist.mean))

    def compiled():
        if args.no_compile:
            raise RuntimeError("skipped by --no-compile")
        dec = torch.compile(vae.decoder)
        enc = torch.compile(vae.encoder)
        return (lambda z: dec(vae.post_quant_conv(z)), lambda x: vae.quant_conv(enc(x)))

    measure("torch.compile fp16", compiled)

    def ort_cuda():
        import onnxruntime

        from trtvae import OrtVae

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RuntimeError("onnxruntime-gpu with CUDAExecutionProvider is not installed")
        o = OrtVae.from_pretrained(dynamic, providers=["CUDAExecutionProvider"])
        return (lambda z: o.decode(z).sample, lambda x: o.encode(x).latent_dist.mean)

    measure("ONNX Runtime CUDA fp16", ort_cuda)

    def trt(path):
        def make():
            if trt_reason:
                raise RuntimeError(trt_reason)
            from trtvae import TRTVae

            t = TRTVae.from_pretrained(path)
            return (lambda z: t.decode(z).sample, lambda x: t.encode(x).latent_dist.mean)

        return make

    measure("TensorRT fp16 dynamic", trt(dynamic))
    saved = sizes
    sizes = [1024] if 1024 in saved else []
    measure("TensorRT fp16 static 1024²", trt(static))
    sizes = saved
    tiled_rows(rows, vae, dynamic, trt_reason, args.repeats)

    eager = {(op, size): ms for b, op, size, ms, _ in rows if b == "PyTorch eager fp16" and ms}
    lines = ["| backend | op | size | median ms | speed-up vs eager | note |", "|---|---|---|---|---|---|"]
    for backend, op, size, ms, note in rows:
        speed = f"{eager[(op, size)] / ms:.2f}×" if ms and (op, size) in eager else ""
        ms_text = f"{ms:.2f}" if ms else "—"
        size_text = f"{size}²" if isinstance(size, int) else size
        lines.append(f"| {backend} | {op} | {size_text} | {ms_text} | {speed} | {note} |")
    table = "\n".join(lines)
    print(table)
    for name, seconds in stages.items():
        print(f"{name}: {seconds:.1f} s")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(
            f"# GPU check\n\nCommand: `{' '.join(sys.argv)}`\n\n```json\n{json.dumps(env, indent=2)}\n```\n\n"
            + "\n".join(f"- {k}: {v:.1f} s" for k, v in stages.items()) + f"\n\n{table}\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
