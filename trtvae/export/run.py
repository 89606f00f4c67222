"""The export as one straight line: load → fp16 audit → export ONNX → check → build engines → verify → manifest."""
from __future__ import annotations

import contextlib
import datetime
import platform
from pathlib import Path

import diffusers
import onnx
import torch
from rich.markup import escape

from .. import __version__
from ..components import component_specs, spatial_factor
from ..manifest import FORMAT, MANIFEST_NAME, SCHEMA_VERSION, has_engines, write_manifest
from ..precision import DTYPE_NAME
from .engine import EngineOptions, build_engine, engines_unavailable_reason, read_timing_cache_record
from .loading import load_vae, peek_config
from .onnx_export import export_onnx, onnx_entry
from .options import ExportOptions
from .outdir import VERIFY_PNG, begin_rewrite, default_out, present_outputs
from .progress import console, stage
from .segments import export_segments
from .verify import verify_export


def run_export(opts: ExportOptions) -> Path:
    """Run one export; return the output folder, finished (manifest written last) or not at all.

    Args:
        opts: what to export and how; checked first, before any model is read.

    Raises:
        OptionError, ModelLoadError, ExportError, VerificationError: each with a message naming what
        was wrong; on any of them no manifest is written.
    """
    opts.check()
    console.print(escape(opts.summary_line()), soft_wrap=True)
    config = peek_config(opts.model, opts.subfolder, opts.family)
    if config is not None and opts.engines != "skip":
        opts.image_profiles(spatial_factor(config))  # before any weights are read

    with stage("load model") as info:
        loaded = load_vae(opts.model, allow_pickle=opts.allow_pickle, subfolder=opts.subfolder, family=opts.family)
        info["detail"] = loaded.source["model"] if loaded.source["kind"] == "demo" else \
            f"{loaded.source['kind']}: {loaded.source['model']}"
    vae = loaded.vae  # stays the untouched fp32 reference for verify
    specs = component_specs(vae.config)
    if opts.engines != "skip":
        opts.image_profiles(spatial_factor(vae.config))  # sizes must be multiples of this model's factor
    out = Path(opts.out) if opts.out is not None else default_out(loaded.name)
    begin_rewrite(out)
    manifest = _manifest_head(vae, loaded.source, opts)

    export_vae = vae  # may become a rescaled copy
    if opts.precision == "fp16":
        from .fp16.safety import make_fp16_safe

        export_vae, manifest["fp16_safety"] = make_fp16_safe(vae, opts.components, out, opts.rescale, opts.fp32_norm,
                                                               images=opts.images)

    for name in opts.components:  # export_onnx checks each graph before it is written
        path = out / f"{name}.onnx"
        with stage(f"export {name} ONNX ({opts.precision})") as info:
            model, digest = export_onnx(export_vae, specs[name], opts.precision, path, fp32_norm=opts.fp32_norm)
            info["path"] = path
        manifest["components"][name] = {**onnx_entry(model, specs[name], opts.precision, path), "sha256": digest}
        del model
        if opts.segments:  # exact tiling's graphs, from the same (possibly rescaled) weights
            with stage(f"export {name} segment graphs") as info:
                entry = export_segments(export_vae, name, opts.precision, out, fp32_norm=opts.fp32_norm)
                info["detail"] = f"{len(entry['steps'])} graphs"
            manifest["components"][name]["segments"] = entry
    export_vae = None  # a rescaled copy is as large as the model; verify needs only the reference

    _build_engines(out, manifest, specs, opts)

    manifest["verify"] = verify_export(vae, out, manifest, specs, opts.precision, opts.components,
                                       grid_path=out / VERIFY_PNG) if opts.verify else {"status": "skipped"}
    if opts.precision == "fp16":
        from .fp16.decide import check_verify_against_audit

        check_verify_against_audit(manifest["fp16_safety"], manifest["verify"])

    manifest["files"] = present_outputs(out)
    write_manifest(out, manifest)
    console.print(f"[bold]Wrote {out / MANIFEST_NAME}[/]")
    _next_steps(out, manifest)
    return out


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
