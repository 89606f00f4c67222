"""The export as one straight line: load → wrap → export ONNX → check → build engine → verify → manifest."""
from __future__ import annotations

import contextlib
import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import onnx
import torch

from .. import __version__
from ..components import COMPONENTS, component_specs, spatial_factor
from ..errors import OptionError, VerificationError
from ..manifest import FORMAT, MANIFEST_NAME, SCHEMA_VERSION, read_manifest, referenced_files, \
    write_manifest
from .loading import DEFAULT_MODEL, load_vae
from .onnx_export import export_onnx, onnx_entry
from .precision import ONNX_DTYPE_NAME, PRECISIONS
from .progress import console, stage
from .verify import VerifyReport, verify_runtime


@dataclass
class ExportOptions:
    model: str = DEFAULT_MODEL
    precision: str = "fp16"
    out: Path | None = None
    components: tuple = COMPONENTS
    verify: bool = True
    allow_pickle: bool = False
    subfolder: str | None = None
    # fp16 only: exact rescaling when the audit finds overflow; GroupNorm statistics in fp32.
    rescale: bool = True
    fp32_norm: bool = False
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Reject nonsense before any work starts."""
        if self.precision not in PRECISIONS:
            raise OptionError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components:
            raise OptionError(f"--components {','.join(self.components)!r}: expected a subset of {','.join(COMPONENTS)}")
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            raise OptionError(f"--out {self.out}: exists and is not a folder")
        if self.fp32_norm and self.precision != "fp16":
            raise OptionError(f"--fp32-norm applies to fp16 graphs; --precision is {self.precision}")


def default_out(name: str) -> Path:
    return Path("engines") / name


def run_export(opts: ExportOptions) -> Path:
    opts.check()
    with stage("load model") as info:
        loaded = load_vae(opts.model, allow_pickle=opts.allow_pickle, subfolder=opts.subfolder)
        info["detail"] = f"{loaded.source['kind']}: {loaded.source['model']}"
    vae = loaded.vae
    out = Path(opts.out) if opts.out is not None else default_out(loaded.name)
    stale = _begin_rewrite(out)
    specs = component_specs(vae.config)

    manifest = _manifest_head(vae, loaded.source, opts.precision)
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

    manifest["verify"] = _verify(vae, out, manifest, specs, opts) if opts.verify else {"status": "skipped"}

    write_manifest(out, manifest)
    for name in stale - referenced_files(manifest):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    console.print(f"[bold]Wrote {out / MANIFEST_NAME}[/]")
    _next_steps(out, manifest)
    return out


def _begin_rewrite(out: Path) -> set:
    """Remove an old manifest first, so an interrupted re-export never looks finished; return its files."""
    out.mkdir(parents=True, exist_ok=True)
    old = set()
    if (out / MANIFEST_NAME).exists():
        with contextlib.suppress(Exception):
            old = referenced_files(read_manifest(out))
        (out / MANIFEST_NAME).unlink()
    return old


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
    try:
        from ..runtime.ort import OrtVae

        runtime = OrtVae(out, manifest, providers=["CPUExecutionProvider"])
    except (ImportError, ValueError) as e:
        console.print(f"[yellow]! verify not run:[/] {e}")
        return {"status": "not_run", "reason": str(e)}
    report = VerifyReport(opts.precision)
    with stage("verify vs PyTorch fp32") as info:
        verify_runtime(vae, runtime, specs, opts.precision, components=opts.components, report=report,
                       grid_path=out / "verify_decoder.png")
        info["detail"] = f"{len(report.rows)} checks"
    console.print(report.table())
    if not report.passed:
        worst = report.failures()[0]
        raise VerificationError(
            f"{len(report.failures())} accuracy check(s) failed, e.g. {worst.tensor} at "
            f"{'×'.join(map(str, worst.shape))}: rel L2 {worst.stats.rel_l2:.2e}, {worst.stats.nonfinite} NaN/inf. "
            f"No manifest was written; the ONNX files in {out} are left for inspection"
        )
    return {"status": "passed", **report.as_dict()}


def _next_steps(out: Path, manifest: dict) -> None:
    console.print("Next:")
    console.print(f"  python -c \"from trtvae import OrtVae; vae = OrtVae.from_pretrained('{out}')\"")
    console.print(f"  C++/Triton: read {out / MANIFEST_NAME} for file names, I/O names, dtypes and shapes")
