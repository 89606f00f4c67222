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
    """The command that rebuilds this folder's engines, with the choices of the original export."""
    opts = manifest.get("export_options", {})
    src = manifest.get("source", {})
    # Folders and files by their resolved path: the user's relative one means nothing elsewhere.
    source = src.get("model") if src.get("kind") in ("folder", "file") else opts.get("model") or src.get("model")
    precision = opts.get("precision", manifest.get("precision", "fp16"))
    cmd = ["vae-export", "--model", str(source or "<model>"), "--precision", precision,
           "--out", str(directory), "--engines", "required"]
    if opts.get("subfolder"):
        cmd += ["--subfolder", opts["subfolder"]]
    # A file's latent scale (and the demo's architecture) is the family it was exported as, not a default.
    family = manifest.get("family") if src.get("kind") in ("file", "demo") else opts.get("family")
    if family:
        cmd += ["--family", family]
    if opts.get("images"):
        cmd += ["--images", opts["images"]]
    if opts.get("components") and sorted(opts["components"]) != ["decoder", "encoder"]:
        cmd += ["--components", ",".join(opts["components"])]
    for flag, key, default in (("--no-rescale", "rescale", True), ("--fp32-norm", "fp32_norm", False),
                               ("--no-segments", "segments", True),
                               ("--allow-pickle", "allow_pickle", False)):
        if opts.get(key, default) != default:
            cmd.append(flag)
    profiles = opts.get("profiles")
    if profiles is None:  # manifests written before export_options: the engines' own record
        built = list(engines(manifest).values())
        profiles = built[0].get("build", {}).get("profile_options", []) if built else []
    for p in profiles:
        cmd += ["--profile", p]
    level = opts.get("builder_optimization_level", defaults.BUILDER_OPTIMIZATION_LEVEL)
    if level != defaults.BUILDER_OPTIMIZATION_LEVEL:
        cmd += ["--builder-optimization-level", str(level)]
    if opts.get("workspace_gib", defaults.WORKSPACE_GIB) not in (defaults.WORKSPACE_GIB, None):
        cmd += ["--workspace", str(opts["workspace_gib"])]
    return shlex.join(cmd)


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
