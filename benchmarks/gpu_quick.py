"""`gpu_check.py --quick`: every runtime path once on the tiny and the demo model, pass/fail against PyTorch fp32.

Paths: decode, encode, batch split, slicing, blend tiling (against diffusers' tiled decode), exact tiling
(segment graphs / TensorRT segment plans: against the untiled engine at a size it takes, and against
PyTorch's untiled decode beyond the engine's profile), 8 threads. `--device cpu` runs the harness itself
on ONNX Runtime CPU.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

# The tiny model is the test suite's (tests/conftest.py), so this needs the repository's tests/ folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


# --- --quick ------------------------------------------------------------------------------------------
# One small profile per model, and the latents each path runs. The profile's min is small enough that
# no tile falls below it (a tile widened to the min would differ from diffusers' tiling, the reference);
# the tiling latent exceeds the profile max, so it could not run whole; the exact latent fits the profile
# but not one tile, so exact tiling is compared with the untiled engine on the same input.
QUICK_MODELS = {
    "tiny": {"resolution": "8-64", "opt": 48, "latent": (16, 24), "tile": 32, "tiled_latent": (40, 40),
             "exact_latent": (24, 29)},
    "demo": {"resolution": "64-512", "opt": 256, "latent": (32, 40), "tile": 256, "tiled_latent": (80, 80),
             "exact_latent": (48, 61)},
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
    ze = latents(2, *plan["exact_latent"])
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
            "zt": reference_decode(zt, tiled=True), "zt_whole": reference_decode(zt),
            "threads": [reference_decode(z) for z in threads_z]}
    rows = [(model, "PyTorch fp32", "decode + encode (reference)", "PASS" if all(
        torch.isfinite(t).all() for t in (refs["z1"], ref_x1)) else "FAIL", None, "the reference itself")]

    def judge(backend, path, fn):
        start = time.perf_counter()
        try:
            pairs = fn()
        except Exception as e:
            rows.append((model, backend, path, "FAIL", None, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))
            return
        stats = [compare(got, want, image=got.shape[1] == 3) for got, want in pairs]
        worst = max(stats, key=lambda s: s.rel_l2)
        ok = all(passes(s, "fp16") for s in stats)
        psnr = f", PSNR {worst.psnr_db:.1f} dB" if worst.psnr_db is not None else ""
        rows.append((model, backend, path, "PASS" if ok else "FAIL", worst.rel_l2,
                     f"{time.perf_counter() - start:.1f} s{psnr}" + ("" if ok else f", max abs {worst.max_abs:.3g}")))

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

        def tiled(mode, z):
            vae.enable_tiling(mode=mode)
            vae.tile_sample_min_size, vae.tile_latent_min_size = plan["tile"], plan["tile"] // factor
            try:
                return vae.decode(z).sample
            finally:
                vae.disable_tiling()

        judge(backend, f"blend tiling ({zt.shape[2] * factor}² > profile max)",
              lambda: [(tiled("blend", zt), refs["zt"])])  # diffusers' tiled decode, seams and all
        judge(backend, f"exact tiling vs untiled ({ze.shape[2] * factor}×{ze.shape[3] * factor}, batch 2)",
              lambda: [(tiled("exact", ze), vae.decode(ze).sample)])  # the same backend's untiled graph
        judge(backend, f"exact tiling vs PyTorch ({zt.shape[2] * factor}² > profile max)",
              lambda: [(tiled("exact", zt), refs["zt_whole"])])

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
    trt_paths = ["decode", "encode", "batch split", "slicing", "blend tiling", "exact tiling vs untiled",
                 "exact tiling vs PyTorch", "8 threads", "exact tiling, host boundaries, vs PyTorch"]
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

    def host_boundaries():  # whole-image tensors between segment plans in CPU memory
        host = TRTVae.from_pretrained(folder, exact_boundaries="host")
        host.enable_tiling(mode="exact")
        host.tile_sample_min_size, host.tile_latent_min_size = plan["tile"], plan["tile"] // factor
        return [(host.decode(zt).sample, refs["zt_whole"])]

    judge("TensorRT", "exact tiling, host boundaries, vs PyTorch", host_boundaries)
    return rows
