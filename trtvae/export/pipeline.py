"""The export as one straight line: load → wrap → export ONNX → check → build engine → verify → manifest."""
from __future__ import annotations

import contextlib
import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import diffusers
import onnx
import torch
from rich.markup import escape

from .. import __version__
from ..components import COMPONENTS, component_specs, parse_components, spatial_factor
from ..errors import OptionError, VerificationError
from ..manifest import FORMAT, MANIFEST_NAME, SCHEMA_VERSION, read_manifest, referenced_files, \
    write_manifest
from ..profiles import make_profile, parse_profile_option
from .engine import EngineOptions, build_engine, engines_unavailable_reason
from .loading import DEFAULT_MODEL, load_vae, peek_config
from .onnx_export import export_onnx, onnx_entry
from .precision import ONNX_DTYPE_NAME, PRECISIONS
from .progress import console, stage
from .verify import VerifyReport, verify_engines, verify_runtime


ENGINE_MODES = ("auto", "required", "skip")
_PROFILE_DEFAULTS = ("1-4", "512-1536", None, None)  # batch, resolution, opt, static
# Everything an export may write besides the manifest; a re-export removes the old ones first.
# timing.cache is not among them: it is meant to outlive exports.
EXTRA_OUTPUTS = ("fp16_audit.json", "fp16_audit.png", "verify_decoder.png")
EXPORT_MARKER = ".trtvae-export"  # says a folder is an export's, finished or not, so it may be cleaned


@dataclass
class ExportOptions:
    model: str = DEFAULT_MODEL
    precision: str = "fp16"
    out: Path | None = None
    components: tuple = COMPONENTS
    verify: bool = True
    allow_pickle: bool = False
    subfolder: str | None = None
    # TensorRT engines: auto (build where TensorRT and a GPU exist), required, or skip.
    engines: str = "auto"
    batch: str = _PROFILE_DEFAULTS[0]
    resolution: str = _PROFILE_DEFAULTS[1]
    opt: int | None = None
    static: str | None = None
    profile: tuple = ()
    optimization_level: int = 3
    workspace_gib: float | None = 8.0
    # fp16 only: exact rescaling when the audit finds overflow; GroupNorm statistics in fp32.
    rescale: bool = True
    fp32_norm: bool = False

    def check(self) -> None:
        """Reject nonsense before any work starts."""
        if self.precision not in PRECISIONS:
            raise OptionError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.components = parse_components(self.components)
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            raise OptionError(f"--out {self.out}: exists and is not a folder")
        if self.engines not in ENGINE_MODES:
            raise OptionError(f"--engines {self.engines!r}: expected one of {', '.join(ENGINE_MODES)}")
        if self.engines != "skip":
            self.image_profiles(factor=1)  # ranges and opt; multiples of the factor once the model is known
            if not 0 <= self.optimization_level <= 5:
                raise OptionError(f"--builder-optimization-level {self.optimization_level}: expected 0 to 5")
            if self.workspace_gib is not None and self.workspace_gib <= 0:
                raise OptionError(f"--workspace {self.workspace_gib}: expected a positive size in GiB")
        if self.fp32_norm and self.precision != "fp16":
            raise OptionError(f"--fp32-norm applies to fp16 graphs; --precision is {self.precision}")
        if self.profile and (self.batch, self.resolution, self.opt, self.static) != _PROFILE_DEFAULTS:
            raise OptionError("--profile replaces --batch/--resolution/--opt/--static: put them inside --profile")
        if self.static and (self.opt is not None or self.resolution != _PROFILE_DEFAULTS[1]):
            raise OptionError("--static fixes one size; it excludes --resolution and --opt")
        if self.engines == "required":
            reason = engines_unavailable_reason()
            if reason:
                raise OptionError(f"--engines required, but {reason}")

    def image_profiles(self, factor: int) -> list:
        if self.profile:
            return [parse_profile_option(text, factor) for text in self.profile]
        return [make_profile(factor, batch=self.batch, resolution=self.resolution, opt=self.opt, static=self.static)]

    def profile_texts(self) -> list:
        """The profiles as --profile values, for the rebuild command in the manifest."""
        if self.profile:
            return list(self.profile)
        if self.static:
            return [f"batch={self.batch},static={self.static}"]
        opt = f",opt={self.opt}" if self.opt is not None else ""
        return [f"batch={self.batch},resolution={self.resolution}{opt}"]

    def as_manifest(self) -> dict:
        """What was asked for, so the engines can be rebuilt elsewhere with the same choices."""
        return {"model": self.model, "subfolder": self.subfolder, "precision": self.precision,
                "components": list(self.components), "rescale": self.rescale, "fp32_norm": self.fp32_norm,
                "allow_pickle": self.allow_pickle, "profiles": self.profile_texts(),
                "builder_optimization_level": self.optimization_level, "workspace_gib": self.workspace_gib}


def _options_line(opts: ExportOptions) -> str:
    """The checked options in one line, so a log shows what was asked for."""
    parts = [f"model={opts.model}", f"precision={opts.precision}", f"out={opts.out or 'engines/<model-name>'}",
             f"components={','.join(opts.components)}", f"verify={'on' if opts.verify else 'off'}",
             f"engines={opts.engines}"]
    if opts.engines != "skip":
        parts.append("profiles=" + " | ".join(opts.profile_texts()))
    if opts.precision == "fp16":
        parts.append(f"rescale={'on' if opts.rescale else 'off'}" + (" fp32-norm" if opts.fp32_norm else ""))
    return escape("vae-export " + "  ".join(parts))


def default_out(name: str) -> Path:
    return Path("engines") / name


def run_export(opts: ExportOptions) -> Path:
    opts.check()
    console.print(_options_line(opts), soft_wrap=True)
    config = peek_config(opts.model, opts.subfolder)
    if config is not None and opts.engines != "skip":
        opts.image_profiles(spatial_factor(config))  # before any weights are read
    with stage("load model") as info:
        loaded = load_vae(opts.model, allow_pickle=opts.allow_pickle, subfolder=opts.subfolder)
        info["detail"] = loaded.source["model"] if loaded.source["kind"] == "demo" else \
            f"{loaded.source['kind']}: {loaded.source['model']}"
    vae = loaded.vae
    specs = component_specs(vae.config)
    if opts.engines != "skip":
        opts.image_profiles(spatial_factor(vae.config))  # sizes must be multiples of this model's factor
    out = Path(opts.out) if opts.out is not None else default_out(loaded.name)
    _begin_rewrite(out)

    manifest = _manifest_head(vae, loaded.source, opts.precision)
    manifest["export_options"] = opts.as_manifest()
    # `vae` stays the untouched fp32 reference for verify; `export_vae` may be a rescaled copy.
    export_vae = vae
    if opts.precision == "fp16":
        from .fp16_safety import prepare_fp16

        export_vae, manifest["fp16_safety"] = prepare_fp16(vae, opts.components, out, opts.rescale, opts.fp32_norm)
    for name in opts.components:
        path = out / f"{name}.onnx"
        with stage(f"export {name} ONNX ({opts.precision})") as info:
            model, digest = export_onnx(export_vae, specs[name], opts.precision, path,
                                        fp32_norm=opts.fp32_norm and opts.precision == "fp16")
            info["path"] = path
        entry = onnx_entry(model, specs[name], opts.precision, path)
        entry["sha256"] = digest
        del model
        manifest["components"][name] = entry
    export_vae = None  # a rescaled copy is as large as the model; verify needs only the reference

    _build_engines(out, manifest, specs, opts)

    manifest["verify"] = _verify(vae, out, manifest, specs, opts) if opts.verify else {"status": "skipped"}

    manifest["files"] = sorted(n for n in _output_names() if (out / n).exists())
    write_manifest(out, manifest)
    console.print(f"[bold]Wrote {out / MANIFEST_NAME}[/]")
    _next_steps(out, manifest)
    return out


def _build_engines(out: Path, manifest: dict, specs: dict, opts: ExportOptions) -> None:
    if opts.engines == "skip":
        return
    names = ", ".join(opts.components)
    reason = engines_unavailable_reason()
    if reason:  # auto: the ONNX export stands on its own; say once what was not built and why
        console.print(f"[yellow]! TensorRT engines not built ({names}):[/] {escape(reason)}")
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


def _output_names() -> set:
    return {f"{c}.{ext}" for c in COMPONENTS for ext in ("onnx", "plan")} | set(EXTRA_OUTPUTS)


def _begin_rewrite(out: Path) -> None:
    """Remove the old manifest first (an interrupted re-export never looks finished), then the old outputs.

    Nothing of an earlier export survives to be mistaken for part of this one: a plan built from
    the old graph, an audit of another model, last time's verify picture. Only a folder that an
    export has written to (manifest or marker) is cleaned; anything else with such names is refused.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    manifest_path, marker = out / MANIFEST_NAME, out / EXPORT_MARKER
    present = sorted(n for n in _output_names() if (out / n).exists())
    if present and not (manifest_path.exists() or marker.exists()):
        raise OptionError(f"--out {out} holds {', '.join(present)} but is not a trtvae export folder; "
                          "choose an empty or new folder")
    old = set()
    if manifest_path.exists():
        with contextlib.suppress(Exception):
            old = referenced_files(read_manifest(out))
        manifest_path.unlink()
    marker.touch()
    for name in ({n for n in old if Path(n).name == n} | _output_names()):  # never outside `out`
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def _manifest_head(vae, source: dict, precision: str) -> dict:
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
        "source": source,
        "precision": precision,
        # Graph inputs and outputs carry the model precision; callers cast (OrtVae/TRTVae do).
        "io_dtype": ONNX_DTYPE_NAME[precision],
        "spatial_factor": spatial_factor(config),
        "vae_config": config,
        "versions": versions,
        "components": {},
    }


def _verify(vae, out: Path, manifest: dict, specs: dict, opts: ExportOptions) -> dict:
    from ..runtime.ort import OrtVae

    notes = []
    try:
        ort_cpu = OrtVae(out, manifest, providers=["CPUExecutionProvider"])
    except (ImportError, ValueError) as e:
        ort_cpu = None
        notes.append(f"onnxruntime: {e}")
    has_engines = any("engine" in c for c in manifest["components"].values())
    if ort_cpu is None and not has_engines:
        console.print(f"[yellow]! verify not run:[/] {notes[0]}")
        return {"status": "not_run", "reason": notes[0]}
    report = VerifyReport(opts.precision)
    with stage("verify vs PyTorch fp32") as info:
        if ort_cpu is not None:
            verify_runtime(vae, ort_cpu, specs, opts.precision, components=opts.components, report=report,
                           grid_path=out / "verify_decoder.png")
        if has_engines:
            from ..runtime.trt import TRTVae

            ort_gpu = _ort_cuda(out, manifest, notes)
            verify_engines(vae, TRTVae(out, manifest), specs, opts.precision, opts.components, report, ort_gpu)
        info["detail"] = f"{len(report.rows)} checks"
    console.print(report.table())
    for note in notes:
        console.print(f"[yellow]! not compared:[/] {note}")
    if not report.passed:
        worst = report.failures()[0]
        raise VerificationError(
            f"{len(report.failures())} accuracy check(s) failed, e.g. {worst.tensor} ({worst.backend}) at "
            f"{'×'.join(map(str, worst.shape))}: rel L2 {worst.stats.rel_l2:.2e}, {worst.stats.nonfinite} NaN/inf. "
            f"No manifest was written; the files in {out} are left for inspection"
        )
    return {"status": "passed", **report.as_dict(), **({"not_compared": notes} if notes else {})}


def _ort_cuda(out: Path, manifest: dict, notes: list):
    """ONNX Runtime on the GPU, to compare engines with at full size; None (noted) where it is missing."""
    from ..runtime.ort import OrtVae

    try:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise ImportError("TensorRT vs ONNX Runtime needs onnxruntime-gpu (CUDAExecutionProvider)")
        return OrtVae(out, manifest, providers=["CUDAExecutionProvider"])
    except (ImportError, ValueError) as e:
        notes.append(str(e))
        return None


def _next_steps(out: Path, manifest: dict) -> None:
    console.print("Next:")
    console.print(f"  python -c \"from trtvae import OrtVae; vae = OrtVae.from_pretrained('{out}')\"")
    console.print(f"  vae-export triton {out} --repo models --backend "
                  f"{'tensorrt' if any('engine' in c for c in manifest['components'].values()) else 'onnx'}")
    console.print(f"  C++: read {out / MANIFEST_NAME} for file names, I/O names, dtypes, shapes and profiles")
