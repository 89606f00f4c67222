"""What must hold before a TensorRT plan is deserialized. Pure Python, testable without TensorRT.

A plan is tied to the TensorRT version and GPU architecture it was built with, and TensorRT
itself only logs a mismatch and returns None; it is also executable code, so its hash is
checked against the manifest first.
"""
from __future__ import annotations

import shlex

from .. import defaults
from ..errors import TrtvaeError
from ..manifest import engines


class EngineMismatchError(TrtvaeError, RuntimeError):
    """The plan cannot run here: wrong TensorRT version, GPU architecture, or changed file."""


def rebuild_command(manifest: dict, directory) -> str:
    """The command that rebuilds this folder's engines, with the choices of the original export.

    Derived from the export's own normalized arguments (export_options["args"]); only the model,
    the output folder and --engines are set here, and a single file's (or the demo's) family.
    """
    src = manifest.get("source", {})
    opts = manifest.get("export_options", {})
    args = opts["args"] if "args" in opts else _legacy_args(opts, manifest)
    # The source as loaded: a folder or file by its resolved path, a Hub id, or the demo.
    model = src.get("model") or _value(args, "--model") or "<model>"
    # A file's latent scale (and the demo's architecture) is the family it was exported as, not a default.
    family = manifest.get("family") if src.get("kind") in ("file", "demo") else _value(args, "--family")
    cmd = ["vae-export", "--model", str(model), "--precision", manifest.get("precision", "fp16"),
           "--out", str(directory), "--engines", "required", *(["--family", family] if family else [])]
    set_here = ("--model", "--precision", "--out", "--engines", "--family")
    kept = [a for i, a in enumerate(args) if a not in set_here and (i == 0 or args[i - 1] not in set_here)]
    return shlex.join(cmd + kept)


def _value(args: list, flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _legacy_args(opts: dict, manifest: dict) -> list:
    """The arguments of a manifest written before export_options["args"], from its recorded options."""
    args = []
    for key, flag in (("subfolder", "--subfolder"), ("family", "--family"), ("images", "--images")):
        if opts.get(key):
            args += [flag, str(opts[key])]
    if opts.get("components") and sorted(opts["components"]) != ["decoder", "encoder"]:
        args += ["--components", ",".join(opts["components"])]
    for flag, key, default in (("--no-rescale", "rescale", True), ("--fp32-norm", "fp32_norm", False),
                               ("--no-segments", "segments", True),
                               ("--allow-pickle", "allow_pickle", False)):
        if opts.get(key, default) != default:
            args.append(flag)
    profiles = opts.get("profiles")
    if profiles is None:  # written before export_options: the engines' own record
        built = list(engines(manifest).values())
        profiles = built[0].get("build", {}).get("profile_options", []) if built else []
    for p in profiles:
        args += ["--profile", p]
    level = opts.get("builder_optimization_level", defaults.BUILDER_OPTIMIZATION_LEVEL)
    if level != defaults.BUILDER_OPTIMIZATION_LEVEL:
        args += ["--builder-optimization-level", str(level)]
    if opts.get("workspace_gib", defaults.WORKSPACE_GIB) not in (defaults.WORKSPACE_GIB, None):
        args += ["--workspace", str(opts["workspace_gib"])]
    return args


def engine_mismatches(entry: dict, trt_version: str, capability: str) -> list:
    """Differences between where a plan was built and this machine, as readable phrases."""
    problems = []
    built_with = entry.get("tensorrt_version")
    if built_with != trt_version:
        problems.append(f"built with TensorRT {built_with}, this machine has TensorRT {trt_version}")
    built_for = entry.get("compute_capability")
    if built_for != capability:
        problems.append(f"built for compute capability {built_for} ({entry.get('gpu', 'unknown GPU')}), "
                        f"this GPU is compute capability {capability}")
    return problems


def check_engine(component: str, entry: dict, trt_version: str, capability: str, manifest: dict, directory) -> None:
    problems = engine_mismatches(entry, trt_version, capability)
    if problems:
        raise EngineMismatchError(
            f"{component} engine {entry.get('file')} cannot run here: {'; '.join(problems)}. "
            f"Rebuild it on this machine: {rebuild_command(manifest, directory)}"
        )
