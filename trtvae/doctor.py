"""`vae-export doctor [DIR] [--json]`: what this machine has, and whether an export folder runs on it.

Meant to be the first thing a GPU user runs and pastes into a bug report. It reads versions and
manifests, hashes files and creates (then drops) one TensorRT builder; it builds and runs nothing.

Exit status: 0 when everything the folder needs is present here, 1 otherwise.
- Without DIR: 0 unless ONNX Runtime is missing (then no runtime of this package can run anything).
- With DIR: 0 when the manifest reads, every ONNX file is present, inside the folder and unchanged,
  ONNX Runtime is installed (OrtVae runs the folder), and every engine the folder has can run here
  (same TensorRT version and compute capability as the build, plan unchanged). A folder without
  engines is 0 (OrtVae runs it; the rebuild command that adds engines is shown where they could be
  built). A folder whose engines cannot run here (no GPU, no TensorRT, another GPU or TensorRT
  version, a changed plan) is 1, with the command that rebuilds them.
"""
from __future__ import annotations

import contextlib
import json
import platform
import shutil
import subprocess
from pathlib import Path

from . import __version__
from .errors import TrtvaeError
from .manifest import ManifestError, component_file, engines, read_manifest, segment_bytes


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0].strip()
    return None


def probe_environment() -> dict:
    """Versions and capabilities of this machine, as plain data (what `check_folder` judges against)."""
    import torch

    env: dict = {"trtvae": __version__, "python": platform.python_version(),
                 "platform": f"{platform.system()} {platform.machine()}",
                 "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available()},
                 "gpu": None, "driver": driver_version()}
    if env["torch"]["cuda_available"]:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        props = torch.cuda.get_device_properties(index)
        env["gpu"] = {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}

    from .export.environment import probe

    found = probe()  # the only TensorRT builder this command creates
    env["tensorrt"] = {"version": found.tensorrt, "error": found.tensorrt_error, "builder": found.builder_status}
    env["polygraphy"] = found.polygraphy

    ort: dict = {"version": None, "providers": []}
    with contextlib.suppress(ImportError):
        import onnxruntime

        ort = {"version": onnxruntime.__version__, "providers": list(onnxruntime.get_available_providers())}
    env["onnxruntime"] = ort
    env["builds_here"] = {"onnx": True, "tensorrt_engines": found.why_not is None, "why_not": found.why_not}
    return env


def check_folder(directory, env: dict) -> dict:
    """Whether each file of an export folder is sound and each engine can run on the machine `env` describes."""
    from .runtime.engine_check import engine_mismatches, rebuild_command

    directory = Path(directory)
    result: dict = {"path": str(directory), "ok": False, "error": None, "components": {}, "engines": {},
                    "runs_with": None, "rebuild_command": None}
    try:
        manifest = read_manifest(directory)
    except (ManifestError, OSError) as e:
        result["error"] = str(e)
        return result
    result["precision"] = manifest.get("precision")
    onnx_ok = True
    for name in manifest["components"]:
        try:
            component_file(directory, manifest, name)
            result["components"][name] = {"onnx": "ok"}
        except (ManifestError, OSError) as e:  # OSError: unreadable (permissions), a path through a file
            result["components"][name] = {"onnx": str(e)}
            onnx_ok = False
        if (segments := _segments_status(directory, manifest, name)) is not None:
            result["components"][name]["segments"] = segments
            onnx_ok = onnx_ok and segments.startswith("ok")

    gpu, trt_version = env.get("gpu"), env["tensorrt"].get("version")
    built = engines(manifest)
    engines_ok = True
    for name, entry in built.items():
        problems = []
        try:
            component_file(directory, manifest, name, key="engine")  # present, inside, sha256
        except (ManifestError, OSError) as e:
            problems.append(str(e))
        if gpu is None:
            problems.append("no CUDA GPU is present")
        if trt_version is None:
            problems.append(f"TensorRT is {env['tensorrt']['error'] or 'missing'}")
        if gpu is not None and trt_version is not None:
            problems += engine_mismatches(entry, trt_version, gpu["compute_capability"])
        result["engines"][name] = {"file": entry.get("file"), "built_with_tensorrt": entry.get("tensorrt_version"),
                                   "built_for": f"{entry.get('gpu')} (compute capability "
                                                f"{entry.get('compute_capability')})",
                                   "runs_here": not problems, "problems": problems}
        engines_ok = engines_ok and not problems

    ort_ok = env["onnxruntime"]["version"] is not None
    if built and engines_ok:
        result["runs_with"] = "TRTVae (or OrtVae)" if onnx_ok and ort_ok else "TRTVae"
    elif onnx_ok and ort_ok:
        result["runs_with"] = "OrtVae"
    result["timing_cache"] = _timing_cache_status(directory, env)
    if not engines_ok or (not built and env["builds_here"]["tensorrt_engines"]):
        result["rebuild_command"] = rebuild_command(manifest, directory)
    result["ok"] = onnx_ok and ort_ok and engines_ok
    return result


def _segments_status(directory: Path, manifest: dict, component: str) -> str | None:
    """Exact tiling's files of a component: "ok (N graphs, M TensorRT plans)" or the first problem; None if none."""
    steps = (manifest["components"][component].get("segments") or {}).get("steps") or []
    if not steps:
        return None
    plans = 0
    try:
        for index, step in enumerate(steps):
            segment_bytes(directory, manifest, component, index)
            if "engine" in step:
                segment_bytes(directory, manifest, component, index, key="engine")
                plans += 1
    except (ManifestError, OSError) as e:
        return f"{e} (exact tiling refuses to run)"
    return f"ok ({len(steps)} graphs, {plans} TensorRT plans)"


def _timing_cache_status(directory: Path, env: dict) -> dict | None:
    """Whether a build here would reuse the folder's timing cache or move it aside. Never affects the exit code."""
    from .export.engine import TIMING_CACHE, read_timing_cache_record, timing_cache_mismatches

    if not (directory / TIMING_CACHE).is_file():
        return None
    record = read_timing_cache_record(directory)
    status = {"record": record, "reused_by_a_build_here": None, "problems": []}
    gpu, trt_version = env.get("gpu"), env["tensorrt"].get("version")
    if gpu is not None and trt_version is not None:
        here = {"gpu": gpu["name"], "compute_capability": gpu["compute_capability"], "tensorrt_version": trt_version}
        status["problems"] = timing_cache_mismatches(record, here)
        status["reused_by_a_build_here"] = not status["problems"]
    return status


def diagnose(directory=None) -> dict:
    env = probe_environment()
    report = {"environment": env, "folder": check_folder(directory, env) if directory is not None else None}
    if report["folder"] is not None:
        ok = report["folder"]["ok"]
    else:
        ok = env["onnxruntime"]["version"] is not None
    report["exit_code"] = 0 if ok else 1
    return report


def render(report: dict) -> str:
    env, folder = report["environment"], report["folder"]
    torch_info, trt_info, ort = env["torch"], env["tensorrt"], env["onnxruntime"]
    gpu = env["gpu"]
    rows = [
        ("trtvae", f"{env['trtvae']} (Python {env['python']}, {env['platform']})"),
        ("torch", f"{torch_info['version']}, built with CUDA {torch_info['cuda'] or 'none (a CPU build)'}"),
        ("GPU", f"{gpu['name']}, compute capability {gpu['compute_capability']}, {gpu['memory_gib']} GiB"
                + (f" (device 0 of {gpu['count']})" if gpu["count"] > 1 else "")
         if gpu else "none: torch sees no CUDA GPU"),
        ("driver", env["driver"] or "none (no nvidia-smi found)"),
        ("TensorRT", trt_info["version"] + (f", builder: {trt_info['builder']}" if trt_info["builder"] else "")
         if trt_info["version"] else trt_info["error"]),
        ("Polygraphy", env["polygraphy"] or "not installed"),
        ("ONNX Runtime", f"{ort['version']}, providers: {', '.join(ort['providers'])}" if ort["version"]
         else "not installed (pip install onnxruntime, or onnxruntime-gpu)"),
        ("vae-export", "builds ONNX and TensorRT engines here" if env["builds_here"]["tensorrt_engines"]
         else f"builds ONNX only here; engines not: {env['builds_here']['why_not']}"),
    ]
    lines = ["vae-export doctor"] + [f"  {k:<13} {v}" for k, v in rows]
    if gpu is None:
        lines += ["", "No GPU is present on this machine: TRTVae cannot run here. OrtVae runs an export folder "
                      "here (ONNX Runtime on the CPU)."]
    if folder is not None:
        lines += ["", f"Folder {folder['path']}"]
        if folder["error"]:
            lines.append(f"  cannot be read: {folder['error']}")
        else:
            lines.append(f"  precision {folder['precision']}")
            for name, info in folder["components"].items():
                lines.append(f"  {name} ONNX: {info['onnx']}")
                if "segments" in info:
                    lines.append(f"  {name} segment graphs (exact tiling): {info['segments']}")
            if not folder["engines"]:
                lines.append("  TensorRT engines: none in this folder")
            for name, info in folder["engines"].items():
                head = (f"  {name} engine {info['file']} (TensorRT {info['built_with_tensorrt']}, "
                        f"{info['built_for']}): ")
                lines.append(head + ("can run here" if info["runs_here"] else
                                     "cannot run here: " + "; ".join(info["problems"])))
            lines.append(f"  runs here with: {folder['runs_with'] or 'nothing (see above)'}")
            cache = folder.get("timing_cache")
            if cache is not None:
                record = cache["record"]
                made = "with no record of where it was made"
                if record:
                    made = (f"made on {record.get('gpu')} (compute capability {record.get('compute_capability')}) "
                            f"with TensorRT {record.get('tensorrt_version')}")
                verdict = {None: "no build possible here", True: "a build here reuses it",
                           False: "a build here moves it aside: made " + "; ".join(cache["problems"])}
                lines.append(f"  timing.cache: {made}; {verdict[cache['reused_by_a_build_here']]}")
        if folder["rebuild_command"]:
            verb = "rebuild the engines on the GPU machine that will run them" if gpu is None or not \
                env["builds_here"]["tensorrt_engines"] else "build or rebuild the engines here"
            lines.append(f"  to {verb}: {folder['rebuild_command']}")
    lines += ["", f"exit {report['exit_code']}: " + ("everything needed is present" if report["exit_code"] == 0
                                                     else "something needed is missing (see above)")]
    return "\n".join(lines)


def doctor_command(directory=None, as_json: bool = False) -> int:
    if directory is not None and not Path(directory).exists():
        raise TrtvaeError(f"{directory} does not exist: expected an export folder holding manifest.json")
    report = diagnose(directory)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return report["exit_code"]
