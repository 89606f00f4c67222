"""The export as one straight line: load → fp16 audit → export ONNX → check → build engines → verify → manifest.

All of it is written into a staging folder that replaces --out only when finished (outdir.Staging).
"""
from __future__ import annotations

import contextlib
import datetime
import platform
import re
from pathlib import Path

import diffusers
import onnx
import torch
from rich.markup import escape

from .. import __version__
from ..components import component_specs, spatial_factor
from ..errors import ExportError, VerificationError, first_line
from ..manifest import FORMAT, MANIFEST_NAME, SCHEMA_VERSION, has_engines, write_manifest
from ..precision import DTYPE_NAME
from .engine import EngineOptions, build_engine, engines_unavailable_reason, read_timing_cache_record
from .fp16.decide import Fp16OverflowError, overflow_gate, overflows_fp16
from .loading import load_vae, peek_config
from .onnx_export import export_onnx, onnx_entry
from .options import ExportOptions
from .outdir import VERIFY_PNG, Staging, check_replaceable, default_out, present_outputs
from .progress import console, stage
from .segment_plans import build_segment_plans
from .segments import export_segments
from .verify import verify_export


def run_export(opts: ExportOptions) -> Path:
    """Run one export; return the output folder, replaced whole by the finished export or not touched at all.

    Args:
        opts: what to export and how; checked first, before any model is read.

    Raises:
        OptionError, ModelLoadError, ExportError, VerificationError: each with a message naming what
        was wrong; on any of them (and on KeyboardInterrupt) --out is left as it was. After a
        VerificationError (fp16 overflow included) the files are kept for inspection in `<out>.inspect`.
    """
    opts.check()
    console.print(escape(opts.summary_line()), soft_wrap=True)
    if opts.out is not None:
        check_replaceable(Path(opts.out))  # before minutes of loading
    config = peek_config(opts.model, opts.subfolder, opts.family)
    if config is not None and opts.engines != "skip":
        opts.image_profiles(spatial_factor(config))  # before any weights are read

    with stage("load model") as info:
        loaded = load_vae(opts.model, allow_pickle=opts.allow_pickle, subfolder=opts.subfolder, family=opts.family)
        info["detail"] = loaded.source["model"] if loaded.source["kind"] == "demo" else \
            f"{loaded.source['kind']}: {loaded.source['model']}"
    if opts.engines != "skip":
        opts.image_profiles(spatial_factor(loaded.vae.config))  # sizes must be multiples of this model's factor
    out = Path(opts.out) if opts.out is not None else default_out(loaded.name)
    with Staging(out) as staging:
        try:
            manifest = _export_into(staging.path, loaded, opts)
        except VerificationError as e:
            kept = staging.keep_for_inspection()
            raise type(e)(f"{e}. {out} was left as it was; the files are kept for inspection only "
                          f"(not an export) in {kept}") from None
        staging.commit()
    console.print(f"[bold]Wrote {out / MANIFEST_NAME}[/]")
    _next_steps(out, manifest)
    return out


def _export_into(folder: Path, loaded, opts: ExportOptions) -> dict:
    """Write the whole export into `folder` (the staging folder), manifest last; return the manifest."""
    vae = loaded.vae  # stays the untouched fp32 reference for verify
    specs = component_specs(vae.config)
    manifest = _manifest_head(vae, loaded.source, opts)
    export_vae, fp32_norm, overflows = vae, opts.fp32_norm, False  # export_vae may become a rescaled copy
    if opts.precision == "fp16":
        from .fp16.safety import make_fp16_safe

        export_vae, record = make_fp16_safe(vae, opts.components, folder, opts.rescale, opts.fp32_norm,
                                            images=opts.images)
        manifest["fp16_safety"] = record
        fp32_norm = record["fp32_norm"]  # may have been switched on by the audit
        overflows = overflows_fp16(record)  # the message is written below, with verify's finding

    for name in opts.components:  # export_onnx checks each graph before it is written
        path = folder / f"{name}.onnx"
        with stage(f"export {name} ONNX ({opts.precision})") as info:
            model, digest = export_onnx(export_vae, specs[name], opts.precision, path, fp32_norm=fp32_norm)
            info["path"] = path
        manifest["components"][name] = {**onnx_entry(model, specs[name], opts.precision, path), "sha256": digest}
        del model
        if opts.segments:  # exact tiling's graphs, from the same (possibly rescaled) weights
            with stage(f"export {name} segment graphs") as info:
                entry = export_segments(export_vae, name, opts.precision, folder, fp32_norm=fp32_norm)
                info["detail"] = f"{len(entry['steps'])} graphs"
            manifest["components"][name]["segments"] = entry
    export_vae = None  # a rescaled copy is as large as the model; verify needs only the reference

    if not overflows:
        with _gpu_memory("the TensorRT build", "lower --workspace (the builder's scratch memory, GiB), or --batch "
                         "or --resolution (a smaller largest profile)"):
            _build_engines(folder, manifest, specs, opts)
    elif opts.engines != "skip":
        console.print("[yellow]! TensorRT engines not built: the fp16 graph overflows (see below)[/]")

    if opts.verify:
        try:
            with _gpu_memory("verify", "lower --batch or --resolution (a smaller largest profile), or pass "
                             "--no-verify"):
                manifest["verify"] = verify_export(vae, folder, manifest, specs, opts.precision, opts.components,
                                                   grid_path=folder / VERIFY_PNG)
        except VerificationError as e:
            if not overflows:
                raise
            manifest["verify"] = {"status": "failed", "reason": str(e).split(". No manifest")[0]}
    else:
        manifest["verify"] = {"status": "skipped"}
    if overflows:  # whatever verify said: ONNX Runtime's CPU kernels hide fp16 overflow
        raise Fp16OverflowError(overflow_gate(manifest["fp16_safety"], manifest["verify"]))
    manifest["files"] = present_outputs(folder)
    write_manifest(folder, manifest)
    return manifest


# How a CUDA out-of-memory reads: PyTorch's OutOfMemoryError, or TensorRT/Polygraphy build messages.
_OUT_OF_MEMORY = re.compile(r"out of memory|insufficient memory|cudaErrorMemoryAllocation|"
                            r"(memory|allocation) (allocation )?failed|failed to allocate", re.IGNORECASE)


@contextlib.contextmanager
def _gpu_memory(where: str, change: str):
    """A CUDA out-of-memory in `where` becomes one line saying what to change, never a traceback."""
    try:
        yield
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError and ExportError are RuntimeErrors
        if isinstance(e, VerificationError) or not (type(e).__name__ == "OutOfMemoryError"
                                                    or _OUT_OF_MEMORY.search(str(e))):
            raise
        raise ExportError(f"out of GPU memory in {where} ({first_line(e, 160)}): {change}") from None


def _build_engines(out: Path, manifest: dict, specs: dict, opts: ExportOptions) -> None:
    if opts.engines == "skip":
        return
    reason = engines_unavailable_reason()
    if reason:  # auto: the ONNX export stands on its own; say once what was not built and why
        console.print(f"[yellow]! TensorRT engines not built ({', '.join(opts.components)}):[/] {escape(reason)}")
        return
    factor = manifest["spatial_factor"]
    options = EngineOptions(profiles=opts.image_profiles(factor), profile_options=opts.profile_texts(),
                            optimization_level=opts.optimization_level, workspace_gib=opts.workspace_gib)
    for name in opts.components:
        plan = out / f"{name}.plan"
        with stage(f"build {name} TensorRT engine") as info:
            entry = build_engine(out / manifest["components"][name]["onnx"], plan, specs[name], factor,
                                 opts.precision, options)
            info["path"] = plan
        manifest["components"][name]["engine"] = entry
        if "segments" in manifest["components"][name]:  # exact tiling's graphs, one plan each
            with stage(f"build {name} segment plans") as info:
                built = build_segment_plans(out, manifest, name, specs[name], options)
                info["detail"] = f"{len(manifest['components'][name]['segments']['steps'])} plans" if built else \
                    "none (see above)"
    record = read_timing_cache_record(out)
    if record:  # where the timing cache was made: a build elsewhere moves it aside instead of re-timing forever
        manifest["timing_cache"] = record


def _manifest_head(vae, source: dict, opts: ExportOptions) -> dict:
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config["force_upcast"] = False
    versions = {"trtvae": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "onnx": onnx.__version__, "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Which published VAE's latent space this is (None: a custom one); vae_config has its factors.
        "family": source.get("family"),
        "source": source,
        "precision": opts.precision,
        # Graph inputs and outputs carry the model precision; callers cast (OrtVae/TRTVae do).
        "io_dtype": DTYPE_NAME[opts.precision],
        "spatial_factor": spatial_factor(config),
        "vae_config": config,
        "versions": versions,
        "components": {},
        "export_options": opts.as_manifest(),
    }


def _next_steps(out: Path, manifest: dict) -> None:
    console.print("Next:")
    console.print(f"  python -c \"from trtvae import OrtVae; vae = OrtVae.from_pretrained('{out}')\"")
    console.print(f"  vae-export serve {out}        # a Triton server on 127.0.0.1:8000 (needs the triton extra)")
    console.print(f"  vae-export triton {out} --repo models --backend {'tensorrt' if has_engines(manifest) else 'onnx'}")
    console.print(f"  C++: read {out / MANIFEST_NAME} for file names, I/O names, dtypes, shapes and profiles")
