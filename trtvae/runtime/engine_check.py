"""What must hold before a TensorRT plan is deserialized. Pure Python, testable without TensorRT.

A plan is tied to the TensorRT version and GPU architecture it was built with, and TensorRT
itself only logs a mismatch and returns None; it is also executable code, so its hash is
checked against the manifest first.
"""
from __future__ import annotations

import shlex

from ..errors import TrtvaeError


class EngineMismatchError(TrtvaeError, RuntimeError):
    """The plan cannot run here: wrong TensorRT version, GPU architecture, or changed file."""


def rebuild_command(manifest: dict, directory) -> str:
    """The command that rebuilds this folder's engines on the machine that must run them."""
    source = manifest.get("source", {}).get("model", "<model>")
    cmd = ["vae-export", "--model", str(source), "--precision", manifest.get("precision", "fp16"),
           "--out", str(directory), "--engines", "required"]
    for entry in manifest.get("components", {}).values():
        for p in entry.get("engine", {}).get("build", {}).get("profile_options", []):
            cmd += ["--profile", p]
        break
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


def input_profiles(entry: dict, input_name: str) -> list:
    """The engine's profiles for its one input as [{min, opt, max}], from the manifest."""
    return [p[input_name] for p in entry["profiles"]]
