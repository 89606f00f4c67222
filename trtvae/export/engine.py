"""Build strongly typed TensorRT engines from the exported ONNX through Polygraphy.

Precision comes from the graph: no fp16/bf16 builder flags exist in TensorRT 11, and 10.x
gets the same behaviour from the STRONGLY_TYPED network flag. The plan file is written raw
(no header), so trtexec, Polygraphy, Triton and C++ load it as is; its metadata goes into
manifest.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from .. import defaults
from ..errors import ExportError
from ..files import atomic_path
from ..precision import DTYPE_NAME, DTYPES
from ..profiles import component_shapes
from .environment import engines_unavailable_reason, probe  # noqa: F401  (run.py reads the reason here)
from .progress import console

TIMING_CACHE = "timing.cache"
# Where the cache was made, next to it: the cache outlives exports (and their manifests, removed first
# by a re-export), and a copied folder carries both.
TIMING_CACHE_RECORD = "timing.cache.json"
STALE_TIMING_CACHE = "timing.cache.stale"


@dataclass
class EngineOptions:
    profiles: list = field(default_factory=list)  # ImageProfile
    profile_options: list = field(default_factory=list)  # the user's text, for the rebuild command
    optimization_level: int = defaults.BUILDER_OPTIMIZATION_LEVEL
    workspace_gib: float | None = defaults.WORKSPACE_GIB


# --- timing cache: reused across builds on the same GPU and TensorRT only -------------------------
def build_machine(trt) -> dict:
    """What a timing cache (and a plan) is tied to: the GPU, its compute capability, the TensorRT version."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt_version": trt.__version__}


def timing_cache_mismatches(record: dict | None, here: dict) -> list:
    """Why a cache made where `record` says cannot serve a build `here`, as readable phrases."""
    if not isinstance(record, dict):
        return [f"without a {TIMING_CACHE_RECORD} saying which GPU and TensorRT version made it"]
    names = {"gpu": "GPU", "compute_capability": "compute capability", "tensorrt_version": "TensorRT"}
    return [f"with {label} {record.get(key)} (this machine: {here[key]})" for key, label in names.items()
            if record.get(key) != here[key]]


def read_timing_cache_record(folder) -> dict | None:
    path = Path(folder) / TIMING_CACHE_RECORD
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else None
    return None


def prepare_timing_cache(folder, here: dict) -> Path | None:
    """The cache to load for a build `here`, or None; a cache from elsewhere is moved aside first.

    TensorRT refuses a mismatched cache (`setTimingCache(..., ignoreMismatch=false)` returns false) and
    Polygraphy ignores that, then merges the fresh cache with the stale file ignoring mismatches, so the
    stale one would never be replaced and every rebuild would time every tactic again.
    """
    folder = Path(folder)
    cache = folder / TIMING_CACHE
    if not cache.is_file():
        return None
    problems = timing_cache_mismatches(read_timing_cache_record(folder), here)
    if not problems:
        return cache
    os.replace(cache, folder / STALE_TIMING_CACHE)
    with contextlib.suppress(FileNotFoundError):
        (folder / TIMING_CACHE_RECORD).unlink()
    text = (f"{cache} was made {'; '.join(problems)}: moved aside to {STALE_TIMING_CACHE}, "
            "this build times every tactic afresh")
    console.print(f"[yellow]! {escape(text)}[/]", soft_wrap=True)
    return None


def finish_timing_cache(folder, here: dict) -> dict | None:
    """After a build: remove Polygraphy's lock file, record where the cache was made; return the record."""
    folder = Path(folder)
    with contextlib.suppress(FileNotFoundError):
        (folder / f"{TIMING_CACHE}.lock").unlink()  # Polygraphy's util.LockFile never removes it
    if not (folder / TIMING_CACHE).is_file():
        return None
    record = {"file": TIMING_CACHE, **here}
    with atomic_path(folder / TIMING_CACHE_RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _progress_monitor(trt):
    """TensorRT's builder progress, printed as phases start and finish."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._started = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._started[phase_name] = time.perf_counter()
            if parent_phase is None:
                console.print(f"    [dim]{phase_name} ({num_steps} steps)[/]")

        def step_complete(self, phase_name, step):
            return True  # returning False would cancel the build

        def phase_finish(self, phase_name):
            took = time.perf_counter() - self._started.pop(phase_name, time.perf_counter())
            if took > 5:
                console.print(f"    [dim]{phase_name} done in {took:.0f} s[/]")

    return Monitor()


def build_engine(onnx_path: Path, plan_path: Path, spec, factor: int, precision: str, options: EngineOptions) -> dict:
    """Build one component's engine; return its manifest entry (written after the plan is in place)."""
    shapes = [component_shapes(p, spec, factor) for p in options.profiles]
    io_type = DTYPE_NAME[precision]
    entry = build_plan(onnx_path, plan_path, f"{spec.name} engine", [{spec.input_name: s} for s in shapes],
                       {spec.input_name: io_type, spec.output_name: io_type}, options)
    entry["profiles_px"] = [p.as_dict() for p in options.profiles]
    entry["build"]["profile_options"] = list(options.profile_options)
    return entry


def build_plan(onnx_path: Path, plan_path: Path, what: str, profiles: list, io_types: dict, options: EngineOptions,
               monitor: bool = True) -> dict:
    """Build one plan from an ONNX file; return its manifest entry (written after the plan is in place).

    profiles: [{input name: {"min", "opt", "max"}}], one optimization profile each; io_types: {I/O name:
    manifest dtype} the built plan must carry. The network is parsed into the process's one builder
    (environment.probe); Polygraphy's config and build loaders do the rest, and never own (or free) it.
    """
    import tensorrt as trt
    import torch
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    found = probe()
    builder = found.builder
    if builder is None:
        raise ExportError(f"cannot build the {what}: {found.why_not}")
    trt_profiles = []
    for shapes in profiles:
        made = Profile()
        for name, s in shapes.items():
            made.add(name, min=s["min"], opt=s["opt"], max=s["max"])
        trt_profiles.append(made)
    cache = plan_path.parent / TIMING_CACHE
    here = build_machine(trt)
    load_cache = prepare_timing_cache(plan_path.parent, here)
    pools = {}
    if options.workspace_gib:
        pools[trt.MemoryPoolType.WORKSPACE] = int(options.workspace_gib * 2**30)
    builder_config = CreateConfig(
        profiles=trt_profiles,
        preview_features=_preview_features(trt),
        builder_optimization_level=options.optimization_level,
        memory_pool_limits=pools or None,
        load_timing_cache=str(load_cache) if load_cache else None,
        progress_monitor=_progress_monitor(trt) if monitor else None,
    )
    # Strongly typed: precision comes from the ONNX tensor types (10.x opts in, 11.x knows nothing else).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights are found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    start = time.perf_counter()
    try:
        plan = EngineBytesFromNetwork((builder, network, parser), config=builder_config,
                                      save_timing_cache=str(cache))()
    except PolygraphyException as e:  # Polygraphy raises on build failures
        raise ExportError(f"TensorRT failed to build the {what}: {str(e).strip()[:300]}") from e
    finally:
        finish_timing_cache(plan_path.parent, here)
    build_seconds = time.perf_counter() - start
    data = bytes(plan)
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(data)

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ExportError(f"TensorRT built the {what} but cannot load it back (see its log above)")
    io = describe_engine_io(trt, engine)
    check_io_dtypes(io, io_types, what)
    return {
        "file": plan_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "tensorrt_version": here["tensorrt_version"],
        "gpu": here["gpu"],
        "compute_capability": here["compute_capability"],
        "cuda_version": torch.version.cuda,
        "profiles": profiles,
        "io": io,
        "build": {
            "strongly_typed": True,
            "builder_optimization_level": options.optimization_level,
            "workspace_gib": options.workspace_gib,
            "timing_cache": TIMING_CACHE,
        },
        "build_seconds": round(build_seconds, 1),
    }


def _preview_features(trt):
    """Let execution memory follow the shapes in use (TensorRT >= 10.10), keeping profile sharing on.

    Polygraphy switches off every preview feature not listed, so the defaults worth keeping are named too.
    """
    wanted = [getattr(trt.PreviewFeature, name) for name in ("RUNTIME_ACTIVATION_RESIZE_10_10",
                                                              "PROFILE_SHARING_0806")
              if hasattr(trt.PreviewFeature, name)]
    return wanted if hasattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10") else None


def describe_engine_io(trt, engine) -> list:
    """I/O names, modes, dtypes and shapes as TensorRT reports them after the build."""
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append({
            "name": name,
            "mode": "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output",
            "dtype": engine.get_tensor_dtype(name).name,
            "shape": list(engine.get_tensor_shape(name)),
        })
    return io


def check_io_dtypes(io: list, io_types: dict, what: str) -> None:
    """The plan's I/O must carry the ONNX graph's types: an fp32 ONNX silently builds an fp32 engine.

    A strongly typed network runs each layer in its ONNX tensor types, and the ONNX graph's weights
    and I/O were checked before the build, so the I/O types are what is left to confirm here.
    io_types: {name: manifest dtype ("float16")} of every I/O tensor of the ONNX graph.
    """
    wrong = []
    for t in io:
        wanted = DTYPES[io_types[t["name"]]]["tensorrt"] if t["name"] in io_types else None
        if t["dtype"] != wanted:
            wrong.append(f"{t['name']}={t['dtype']} (expected {wanted or 'no such tensor in the ONNX graph'})")
    if wrong:
        raise ExportError(f"{what} I/O is {', '.join(wrong)}")
