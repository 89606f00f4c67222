"""What `vae-export` may be asked, checked before any work starts.

Each field carries its command-line flag and help (`cli`), so `trtvae.cli` builds its parser
from this dataclass and the API and the CLI cannot drift apart.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import defaults
from ..components import parse_components
from ..errors import OptionError
from ..precision import PRECISIONS
from ..profiles import make_profile, parse_profile_option
from .engine import engines_unavailable_reason
from .families import NAMES as FAMILY_NAMES
from .families import check_name as check_family
from .fp16.calibration import list_images

ENGINE_MODES = ("auto", "required", "skip")
ENGINES_GROUP = "TensorRT engines (built where TensorRT and a CUDA GPU are present)"


def cli(*flags: str, group: str | None = None, **argparse_kwargs):
    """Field metadata: the flag(s) and argparse keywords of one option."""
    return {"cli": {"flags": flags, "group": group, "kwargs": argparse_kwargs}}


def _option(default, *flags, group=None, **kwargs):
    return field(default=default, metadata=cli(*flags, group=group, **kwargs))


@dataclass
class ExportOptions:
    """Everything one export is asked to do; `run_export(ExportOptions(...))` runs it.

    Args:
        model: Hub repo id, local diffusers folder, single .safetensors file, or "demo".
        precision: "fp32", "fp16" or "bf16": the tensor type inside the graphs.
        out: output folder (default engines/<model-name>/).
        components: "decoder,encoder" or a subset, as a string or a sequence of names.
        verify: compare with the PyTorch fp32 reference and fail on a missed threshold.
        allow_pickle: accept .ckpt/.bin/.pt weights (pickle can run code).
        subfolder: subfolder of a Hub repo holding the VAE.
        family: "sd15", "sdxl", "sd3" or "flux": the latent space (scaling/shift factors) of a single
            file, whose weights cannot tell; checked against a folder's own config; the demo's architecture.
        images: a folder of PNG/JPEG images added to the fp16 audit's calibration set.
        engines: "auto" (build where TensorRT and a GPU exist), "required" or "skip".
        batch, resolution, opt, static: one engine profile (batch MIN-MAX, image side MIN-MAX in
            pixels, the side it is tuned for, or one fixed WxH size).
        profile: several profiles, each as "batch=1-4,resolution=512-1024,opt=768"; excludes the above.
        optimization_level: TensorRT builder optimization level 0-5.
        workspace_gib: TensorRT workspace cap in GiB.
        rescale: fp16: rescale exactly when the audit finds overflow.
        fp32_norm: fp16: keep GroupNorm statistics in fp32 inside the graph.
        segments: also export the segment graphs exact tiling runs (default on).
    """

    model: str = _option(defaults.MODEL, "--model",
                         help="Hub repo id, local diffusers folder, single .safetensors file, or 'demo' "
                              "(default %(default)s)")
    precision: str = _option(defaults.PRECISION, "--precision", choices=PRECISIONS,
                             help="tensor type inside the graphs (default %(default)s)")
    out: Path | None = _option(None, "--out", type=Path, help="output folder (default engines/<model-name>/)")
    components: tuple | str = _option(defaults.COMPONENTS, "--components",
                                      help="comma-separated: decoder,encoder (default both)")
    verify: bool = _option(True, "--verify", action="boolean_optional",
                           help="compare with the PyTorch fp32 reference and fail on a missed threshold (default on)")
    rescale: bool = _option(True, "--no-rescale", action="store_false",
                            help="fp16: do not rescale activations exactly when the audit finds overflow "
                                 "(verify then fails on the NaNs)")
    fp32_norm: bool = _option(False, "--fp32-norm", action="store_true",
                              help="fp16: keep GroupNorm statistics in fp32 inside the graph (Casts around them)")
    segments: bool = _option(True, "--no-segments", action="store_false",
                             help="do not export the segment graphs that exact tiling runs (enable_tiling() then "
                                  "blends tiles as diffusers does, with seams)")
    engines: str = _option(defaults.ENGINES, "--engines", group=ENGINES_GROUP, choices=ENGINE_MODES,
                           help="auto: build if possible, else say why not; required: fail without; skip: ONNX only")
    batch: str = _option(defaults.BATCH, "--batch", group=ENGINES_GROUP,
                         help="batch range MIN-MAX (default %(default)s)")
    resolution: str = _option(defaults.RESOLUTION, "--resolution", group=ENGINES_GROUP,
                              help="image side range in pixels MIN-MAX (default %(default)s)")
    opt: int | None = _option(None, "--opt", group=ENGINES_GROUP, type=int,
                              help=f"image side the profile is tuned for (default {defaults.OPT})")
    static: str | None = _option(None, "--static", group=ENGINES_GROUP, metavar="WxH",
                                 help="one fixed image size instead of a range")
    profile: tuple = _option((), "--profile", group=ENGINES_GROUP, action="append", metavar="SPEC",
                             help="repeatable, one profile each: batch=1-4,resolution=512-1024,opt=768 or "
                                  "batch=1,static=1024x1024")
    optimization_level: int = _option(defaults.BUILDER_OPTIMIZATION_LEVEL, "--builder-optimization-level", metavar="LEVEL",
                                      group=ENGINES_GROUP, type=int,
                                      help="TensorRT builder level 0-5 (default %(default)s)")
    workspace_gib: float | None = _option(defaults.WORKSPACE_GIB, "--workspace", group=ENGINES_GROUP, type=float,
                                          metavar="GIB", help="TensorRT workspace cap in GiB (default %(default)s); "
                                                              "bounds build memory in the attention block")
    subfolder: str | None = _option(None, "--subfolder", help="subfolder of a Hub repo holding the VAE (e.g. vae)")
    family: str | None = _option(None, "--family", choices=FAMILY_NAMES,
                                 help="VAE family: its latent scale for a single file (weights cannot tell SD1 from "
                                      "SDXL or SD3 from FLUX.1; default for 4 channels: sdxl), checked against a "
                                      "folder's config, and the architecture of --model demo (default sdxl)")
    images: Path | None = _option(None, "--images", type=Path, metavar="DIR",
                                  help="fp16: add the PNG/JPEG images in DIR to the audit's calibration set")
    allow_pickle: bool = _option(False, "--allow-pickle", action="store_true",
                                 help="allow .ckpt/.bin/.pt weights (pickle can run code: only for sources you trust)")

    def check(self) -> None:
        """Reject nonsense before any work starts."""
        check_family(self.family)
        if self.images is not None:
            list_images(self.images)  # a missing or empty folder fails now, not after the model is loaded
            if self.precision != "fp16":
                raise OptionError(f"--images calibrates the fp16 audit; --precision is {self.precision}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.components = parse_components(self.components)
        self.profile = tuple(self.profile)
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
        if self.static and (self.opt is not None or self.resolution != defaults.RESOLUTION):
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

    def export_args(self) -> list:
        """This export's command line, normalized: each option that differs from its default, by its flag.

        The engine profiles appear as --profile texts and local paths as absolute ones, so the command
        means the same on another machine. Read from the fields' own flags: the rebuild command
        (runtime/engine_check.py) is derived from this list and names no option itself.
        """
        args = []
        for f in fields(self):
            spec, value = f.metadata["cli"], getattr(self, f.name)
            # None (e.g. no workspace cap, API only) has no command-line spelling: the default stands in.
            if f.name in _PROFILE_FIELDS or value is None or _text(value) == _text(f.default):
                continue
            flag, action = spec["flags"][0], spec["kwargs"].get("action")
            if action == "boolean_optional":
                args.append(flag if value else "--no-" + flag[2:])
            elif action in ("store_true", "store_false"):
                args.append(flag)
            else:
                args += [flag, _text(value, path=f.name in ("model", "out", "images"))]
        for text in self.profile_texts():
            args += ["--profile", text]
        return args

    def as_manifest(self) -> dict:
        """What was asked for, so the engines can be rebuilt elsewhere with the same choices."""
        return {"args": self.export_args(), "model": self.model, "subfolder": self.subfolder, "family": self.family,
                "images": None if self.images is None else str(Path(self.images).resolve()), "precision": self.precision,
                "components": list(self.components), "rescale": self.rescale, "fp32_norm": self.fp32_norm,
                "segments": self.segments, "allow_pickle": self.allow_pickle, "profiles": self.profile_texts(),
                "builder_optimization_level": self.optimization_level, "workspace_gib": self.workspace_gib}

    def summary_line(self) -> str:
        """The checked options in one line, so a log shows what was asked for."""
        parts = [f"model={self.model}", *([f"family={self.family}"] if self.family else []),
                 f"precision={self.precision}",
                 f"out={self.out or defaults.OUT_ROOT + '/<model-name>'}",
                 f"components={','.join(self.components)}", f"verify={'on' if self.verify else 'off'}",
                 f"engines={self.engines}"]
        if self.engines != "skip":
            parts.append("profiles=" + " | ".join(self.profile_texts()))
        if self.precision == "fp16":
            parts.append(f"rescale={'on' if self.rescale else 'off'}" + (" fp32-norm" if self.fp32_norm else ""))
            if self.images is not None:
                parts.append(f"images={self.images}")
        return "vae-export " + "  ".join(parts)


_PROFILE_DEFAULTS = (defaults.BATCH, defaults.RESOLUTION, None, None)  # batch, resolution, opt, static
_PROFILE_FIELDS = ("batch", "resolution", "opt", "static", "profile")  # in export_args as --profile texts


def _text(value, path: bool = False) -> str | None:
    """An option's value as the command line writes it; a local path made absolute."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    local = Path(os.path.expanduser(str(value)))
    return str(local.resolve()) if path and local.exists() else str(value)
