"""manifest.json: the contract between the exporter and every consumer (Python, C++, Triton).

Plain JSON, read without this package. Plan and ONNX files stay raw; everything a
loader needs to know about them lives here, next to them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path, PureWindowsPath

from .errors import TrtvaeError
from .files import atomic_path, sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMAT = "trtvae"


class ManifestError(TrtvaeError, ValueError):
    pass


def write_manifest(directory, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: {directory} is not a finished trtvae export "
            f"(an export writes {MANIFEST_NAME} last, after verification). "
            f"Run `vae-export --out {directory}` first."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {version!r} is not supported by this trtvae "
            f"(expected {SCHEMA_VERSION}); re-export with this version of trtvae"
        )
    for key in ("components", "vae_config", "precision"):
        if key not in manifest:
            raise ManifestError(f"{path}: required key {key!r} is missing")
    return manifest


def _component_path(directory, manifest: dict, component: str, key: str) -> tuple[Path, dict]:
    entry = manifest["components"].get(component)
    if entry is None or key not in entry:
        raise ManifestError(
            f"manifest has no {key!r} file for component {component!r}; it lists: {sorted(manifest['components'])}"
        )
    info = entry[key] if isinstance(entry[key], dict) else {"file": entry[key], "sha256": entry.get("sha256")}
    return _listed_file(directory, info, f"component {component!r} {key!r}"), info


def _segment_path(directory, manifest: dict, component: str, index: int, key: str | None) -> tuple[Path, dict]:
    try:
        info = manifest["components"][component]["segments"]["steps"][index]
        info = info if key is None else info[key]
    except (KeyError, IndexError, TypeError):
        what = f"segment {index}" + (f" {key!r} file" if key else "")
        raise ManifestError(f"manifest lists no {what} for component {component!r}") from None
    return _listed_file(directory, info, f"component {component!r} segment {index}"), info


def _listed_file(directory, info: dict, what: str) -> Path:
    path = _inside(Path(directory), info.get("file"), what)
    if not path.is_file():
        raise ManifestError(f"{path} is listed in the manifest but missing")
    return path


def _check_digest(path: Path, actual: str, info: dict) -> None:
    if info.get("sha256") and actual != info["sha256"]:
        raise ManifestError(
            f"{path}: sha256 {actual[:16]}… does not match the manifest's {info['sha256'][:16]}…; "
            f"the file was changed or replaced after export. Re-export to rebuild it."
        )


def _checked_bytes(path: Path, info: dict) -> bytes:
    """The file, read once and checked against its sha256 in memory.

    What is loaded is exactly what was hashed: a file swapped between a check and a second read
    (a plan is executable code) is never loaded.
    """
    data = path.read_bytes()
    _check_digest(path, hashlib.sha256(data).hexdigest(), info)
    return data


def component_file(directory, manifest: dict, component: str, key: str = "onnx") -> Path:
    """Path of a component's file, after checking it exists and matches the manifest's sha256."""
    path, info = _component_path(directory, manifest, component, key)
    if info.get("sha256"):
        _check_digest(path, sha256_file(path), info)
    return path


def component_bytes(directory, manifest: dict, component: str, key: str = "onnx") -> bytes:
    """A component's file, read once and checked against the manifest's sha256."""
    return _checked_bytes(*_component_path(directory, manifest, component, key))


def segment_bytes(directory, manifest: dict, component: str, index: int, key: str | None = None) -> bytes:
    """Segment graph `index` of a component (exact tiling), read once and checked against its sha256.

    key: None for the ONNX file, or the name of a per-segment file entry ("engine": a TensorRT plan).
    """
    return _checked_bytes(*_segment_path(directory, manifest, component, index, key))


def _inside(directory: Path, name, what: str) -> Path:
    """`directory / name`, refused unless it stays in the folder, symlinks resolved.

    A manifest is data, possibly from elsewhere; the sha256 check alone would still load a matching
    file from anywhere on disk (a plan is executable code).
    """
    expected = "a file name relative to the export folder, e.g. 'decoder.onnx'"
    if not isinstance(name, str) or not name:
        raise ManifestError(f"manifest {what}: file is {name!r}, expected {expected}")
    relative = Path(name)
    if relative.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in PureWindowsPath(name).parts:
        raise ManifestError(f"manifest {what}: file {name!r} points outside {directory}; expected {expected}")
    path = directory / relative
    root = directory.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise ManifestError(f"manifest {what}: {path} is a link to {resolved}, outside {root}; expected {expected} "
                            f"(copy the file into the folder instead of linking to it)")
    return path


def referenced_files(manifest: dict) -> set:
    """File names a manifest points at, so a re-export can remove stale ones."""
    files = set(manifest.get("files", []))
    for entry in manifest.get("components", {}).values():
        if isinstance(entry.get("onnx"), str):
            files.add(entry["onnx"])
        files.update(v["file"] for v in entry.values() if isinstance(v, dict) and isinstance(v.get("file"), str))
        segments = entry.get("segments")
        for step in segments.get("steps", []) if isinstance(segments, dict) else []:
            files.update(f["file"] for f in (step, step.get("engine")) if isinstance(f, dict)
                         and isinstance(f.get("file"), str))
    return files


def engines(manifest: dict) -> dict:
    """{component: engine entry} of the components that have a TensorRT engine."""
    return {name: c["engine"] for name, c in manifest.get("components", {}).items() if "engine" in c}


def has_engines(manifest: dict) -> bool:
    return bool(engines(manifest))


def engine_profiles(entry: dict, input_name: str) -> list:
    """An engine's profiles for its one input as [{min, opt, max}]."""
    return [p[input_name] for p in entry["profiles"]]


def segment_plans(manifest: dict, component: str) -> list | None:
    """The TensorRT plan entries of a component's segment graphs, in step order; None unless every step has one."""
    segments = manifest.get("components", {}).get(component, {}).get("segments")
    steps = segments.get("steps", []) if isinstance(segments, dict) else []
    plans = [s.get("engine") for s in steps]
    return plans if plans and all(isinstance(p, dict) for p in plans) else None
