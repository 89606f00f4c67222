"""End-to-end check on a GPU machine: export, engine build, verify, then decode/encode timings per backend.

    python benchmarks/gpu_check.py                      # demo model, fp16, 512²/1024²/1536²
    python benchmarks/gpu_check.py --model madebyollin/sdxl-vae-fp16-fix --report docs/gpu-check.md
    python benchmarks/gpu_check.py --quick              # correctness of every runtime path, a few minutes

--quick: exports and builds the tiny and the demo model at one small profile, runs every runtime path once
(decode, encode, tiling, slicing, batch split, 8 threads) and prints a pass/fail table against
PyTorch fp32 (relative L2 within the fp16 threshold). Without TensorRT it still runs the PyTorch and ONNX
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

# --quick builds the test suite's tiny VAE (tests/conftest.py), so it needs the repository's tests/ folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


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


# --- --quick ------------------------------------------------------------------------------------------
# One small profile per model, and the latents each path runs. The profile's min is small enough that
# no tile falls below it (a tile widened to the min would differ from diffusers' tiling, the reference);
# the tiling latent exceeds the profile max, so it could not run whole.
QUICK_MODELS = {
    "tiny": {"resolution": "8-64", "opt": 48, "latent": (16, 24), "tile": 32, "tiled_latent": (40, 40)},
    "demo": {"resolution": "64-512", "opt": 256, "latent": (32, 40), "tile": 256, "tiled_latent": (80, 80)},
}


def quick(args) -> int:
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU visible to torch: --quick checked nothing. Run it on a GPU machine; "
              "`vae-export doctor` says what this one has.")
        return 2
    from trtvae.export.engine import engines_unavailable_reason

    reason = engines_unavailable_reason() if device == "cuda" else None
    trt_reason = f"TensorRT is missing here ({reason})" if reason else None
    if device == "cpu":
        trt_reason = "--device cpu checks the harness only; TensorRT rows need a GPU"
    if trt_reason:
        print(f"{trt_reason}. The PyTorch and ONNX Runtime rows still run; every TensorRT row says why it did not.")
    rows = []  # (model, backend, path, status, rel_l2, note)
    stages = {}
    for name in args.models.split(","):
        plan = QUICK_MODELS[name]
        t = time.perf_counter()
        folder, ref = _quick_export(name, plan, args.out / "quick", device)
        stages[f"{name}: export + build"] = time.perf_counter() - t
        t = time.perf_counter()
        rows += _quick_rows(name, plan, folder, ref, trt_reason, device)
        stages[f"{name}: checks"] = time.perf_counter() - t
        del ref
        if device == "cuda":
            torch.cuda.empty_cache()
    width = max(len(r[2]) for r in rows)
    lines = [f"{'model':<5}  {'backend':<22}  {'path':<{width}}  {'result':<6}  {'rel L2':>9}  note"]
    for model, backend, path, status, rel, note in rows:
        rel_text = f"{rel:.2e}" if rel is not None else "-"
        lines.append(f"{model:<5}  {backend:<22}  {path:<{width}}  {status:<6}  {rel_text:>9}  {note}")
    print("\n".join(lines))
    for stage, seconds in stages.items():
        print(f"{stage}: {seconds:.1f} s")
    failed = [r for r in rows if r[3] == "FAIL"]
    ran = [r for r in rows if r[3] == "PASS"]
    print(f"{len(ran)} passed, {len(failed)} failed, {len(rows) - len(ran) - len(failed)} not run "
          f"(threshold: relative L2 <= the fp16 export threshold against PyTorch fp32)")
    return 1 if failed else 0


def _quick_export(name: str, plan: dict, root: Path, device: str):
    from trtvae.export.loading import load_vae
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    model = "demo"
    if name == "tiny":
        from conftest import make_tiny_vae

        source = root / "tiny-model"
        make_tiny_vae(seed=0).save_pretrained(source)
        model = str(source)
    # verify=False: every row below is its own check against PyTorch fp32, on the GPU.
    # Optimization level 2: builds fast enough for a short loan; this checks correctness, not speed.
    folder = run_export(ExportOptions(model=model, precision="fp16", out=root / name, engines="auto", batch="1-2",
                                      resolution=plan["resolution"], opt=plan["opt"], verify=False,
                                      optimization_level=2))
    ref = load_vae(model).vae.float().to(device).eval()
    return folder, ref


def _quick_rows(model: str, plan: dict, folder: Path, ref, trt_reason, device: str) -> list:
    import threading

    import onnxruntime
    import torch

    from trtvae.metrics import compare, passes

    factor = 2 ** (len(ref.config.block_out_channels) - 1)
    h, w = plan["latent"]
    gen = torch.Generator(device=device).manual_seed(0)

    def latents(b, hh=h, ww=w):
        return torch.randn(b, ref.config.latent_channels, hh, ww, device=device, generator=gen)

    z1, z2, z3 = latents(1), latents(2), latents(3)
    x1 = torch.rand(1, 3, h * factor, w * factor, device=device, generator=gen) * 2 - 1
    zt = latents(1, *plan["tiled_latent"])
    threads_z = [latents(1) for _ in range(8)]

    def reference_decode(z, tiled=False):
        if tiled:
            ref.enable_tiling()
            ref.tile_sample_min_size, ref.tile_latent_min_size = plan["tile"], plan["tile"] // factor
        try:
            with torch.no_grad():
                return ref.decode(z).sample
        finally:
            ref.disable_tiling()

    with torch.no_grad():
        ref_x1 = ref.encode(x1).latent_dist.mean
    refs = {"z1": reference_decode(z1), "z2": reference_decode(z2), "z3": reference_decode(z3),
            "zt": reference_decode(zt, tiled=True), "threads": [reference_decode(z) for z in threads_z]}
    rows = [(model, "PyTorch fp32", "decode + encode (reference)", "PASS" if all(
        torch.isfinite(t).all() for t in (refs["z1"], ref_x1)) else "FAIL", None, "the reference itself")]

    def judge(backend, path, fn):
        start = time.perf_counter()
        try:
            pairs = fn()
        except Exception as e:
            rows.append((model, backend, path, "FAIL", None, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))
            return
        stats = [compare(got, want) for got, want in pairs]
        worst = max(stats, key=lambda s: s.rel_l2)
        ok = all(passes(s, "fp16") for s in stats)
        rows.append((model, backend, path, "PASS" if ok else "FAIL", worst.rel_l2,
                     f"{time.perf_counter() - start:.1f} s" + ("" if ok else f", max abs {worst.max_abs:.3g}")))

    def paths(vae, backend):
        judge(backend, "decode", lambda: [(vae.decode(z1).sample, refs["z1"])])
        judge(backend, "encode", lambda: [(vae.encode(x1).latent_dist.mean, ref_x1)])
        judge(backend, "batch split (3 > max 2)", lambda: [(vae.decode(z3).sample, refs["z3"])])

        def sliced():
            vae.enable_slicing()
            try:
                return [(vae.decode(z2).sample, refs["z2"])]  # image 1 starts at an unaligned offset
            finally:
                vae.disable_slicing()

        judge(backend, "slicing (batch 2)", sliced)

        def tiled():
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = plan["tile"], plan["tile"] // factor
            try:
                return [(vae.decode(zt).sample, refs["zt"])]
            finally:
                vae.disable_tiling()

        judge(backend, f"tiling ({zt.shape[2] * factor}² > profile max)", tiled)

        def threaded():
            results = [None] * 8

            def work(i):
                with torch.inference_mode():
                    results[i] = vae.decode(threads_z[i]).sample
                    if device == "cuda":
                        torch.cuda.current_stream().synchronize()

            workers = [threading.Thread(target=work, args=(i,)) for i in range(8)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            missing = [i for i, r in enumerate(results) if r is None]
            if missing:
                raise RuntimeError(f"threads {missing} raised (see above)")
            return list(zip(results, refs["threads"]))

        judge(backend, "8 threads", threaded)

    if device == "cpu":  # checks the harness: its references, tolerances and paths, with no GPU
        from trtvae import OrtVae

        paths(OrtVae.from_pretrained(folder), "ONNX Runtime CPU")
    elif "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        from trtvae import OrtVae

        paths(OrtVae.from_pretrained(folder, providers=["CUDAExecutionProvider"]), "ONNX Runtime CUDA")
    else:
        rows.append((model, "ONNX Runtime CUDA", "decode, encode", "-", None,
                     "not run: onnxruntime-gpu with CUDAExecutionProvider is not installed"))
    trt_paths = ["decode", "encode", "batch split", "slicing", "tiling", "8 threads"]
    if trt_reason:
        rows += [(model, "TensorRT", p, "-", None, f"not run: {trt_reason}") for p in trt_paths]
        return rows
    from trtvae import TRTVae

    try:
        trt_vae = TRTVae.from_pretrained(folder)
    except Exception as e:
        rows += [(model, "TensorRT", p, "FAIL", None, f"TRTVae did not load: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:150]}") for p in trt_paths]
        return rows
    paths(trt_vae, "TensorRT")
    return rows


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
