"""Build strongly typed TensorRT engines from the exported ONNX through Polygraphy.

Precision comes from the graph: no fp16/bf16 builder flags exist in TensorRT 11, and 10.x
gets the same behaviour from the STRONGLY_TYPED network flag. The plan file is written raw
(no header), so trtexec, Polygraphy, Triton and C++ load it as is; its metadata goes into
manifest.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from .. import defaults
from ..errors import ExportError, first_line
from ..files import atomic_path
from ..profiles import component_shapes
from .progress import console

TIMING_CACHE = "timing.cache"
# Where the cache was made, next to it: the cache outlives exports (and their manifests, removed first
# by a re-export), and a copied folder carries both.
TIMING_CACHE_RECORD = "timing.cache.json"
STALE_TIMING_CACHE = "timing.cache.stale"
_PRECISION_TYPES = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}


@dataclass
class EngineOptions:
    profiles: list = field(default_factory=list)  # ImageProfile
    profile_options: list = field(default_factory=list)  # the user's text, for the rebuild command
    optimization_level: int = defaults.BUILDER_OPTIMIZATION_LEVEL
    workspace_gib: float | None = defaults.WORKSPACE_GIB


def engines_unavailable_reason() -> str | None:
    """Why engines cannot be built here, in a few words; None when they can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt, or the .[gpu] extra)"
    if importlib.util.find_spec("polygraphy") is None:
        return "Polygraphy is not installed (pip install polygraphy)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    try:
        import tensorrt  # the libraries may be missing behind the bindings
    except Exception as e:  # an ImportError or OSError from the native libraries
        return f"TensorRT does not import: {first_line(e, 160)}"
    return builder_problem(tensorrt)


def builder_problem(tensorrt) -> str | None:
    """Why TensorRT cannot create a builder here, or None. Needs a GPU to say anything useful.

    A driver too old for this TensorRT build fails only here, as a TypeError from the bindings'
    constructor (not a PolygraphyException), so the build would crash instead of being skipped.
    """
    version = getattr(tensorrt, "__version__", "?")
    try:
        builder = tensorrt.Builder(tensorrt.Logger(tensorrt.Logger.ERROR))
    except Exception as e:
        return (f"TensorRT {version} cannot create a builder on this machine ({type(e).__name__}: "
                f"{first_line(e, 160)}); is the NVIDIA driver recent enough for this TensorRT build?")
    if not builder:
        return f"TensorRT {version} returned no builder (see its log above)"
    del builder
    return None


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
    import tensorrt as trt
    import torch
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    shapes = [component_shapes(p, spec, factor) for p in options.profiles]
    trt_profiles = [Profile().add(spec.input_name, min=s["min"], opt=s["opt"], max=s["max"]) for s in shapes]
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
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,  # lets the precision check read layer types
        progress_monitor=_progress_monitor(trt),
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    start = time.perf_counter()
    try:
        plan = EngineBytesFromNetwork(network, config=builder_config, save_timing_cache=str(cache))()
    except PolygraphyException as e:  # Polygraphy raises on parse and build failures
        raise ExportError(f"TensorRT failed to build the {spec.name} engine: {str(e).strip()[:300]}") from e
    finally:
        finish_timing_cache(plan_path.parent, here)
    build_seconds = time.perf_counter() - start
    data = bytes(plan)
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(data)

    trt_logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ExportError(f"TensorRT built the {spec.name} engine but cannot load it back (see its log above)")
    io = describe_engine_io(trt, engine)
    conv_types = check_engine_precision(trt, engine, io, precision, spec, shapes[0]["opt"])
    return {
        "file": plan_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "tensorrt_version": here["tensorrt_version"],
        "gpu": here["gpu"],
        "compute_capability": here["compute_capability"],
        "cuda_version": torch.version.cuda,
        "profiles": [{spec.input_name: s} for s in shapes],
        "profiles_px": [p.as_dict() for p in options.profiles],
        "io": io,
        "convolution_output_types": conv_types,
        "build": {
            "strongly_typed": True,
            "builder_optimization_level": options.optimization_level,
            "workspace_gib": options.workspace_gib,
            "timing_cache": TIMING_CACHE,
            "profile_options": list(options.profile_options),
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


def layer_precision(format_text: str) -> str | None:
    """'Row major linear FP16 format', 'Half', 'Float', 'BFloat16'... → fp16/fp32/bf16; None if unknown."""
    text = format_text.upper()
    if "BF16" in text or "BFLOAT16" in text:
        return "bf16"
    if "FP16" in text or "HALF" in text:
        return "fp16"
    if "FP32" in text or "FLOAT" in text:
        return "fp32"
    return None


def tensor_format(element) -> str:
    """An inspector tensor's type and format as one text, in the 10.x layout ("Format/Datatype") or
    the 11.x one (separate "Datatype" and "Format", as Polygraphy 0.53.6's engine extractor reads it)."""
    if not isinstance(element, dict):
        return ""
    if "Format/Datatype" in element:
        return str(element["Format/Datatype"])
    return " ".join(str(element[k]) for k in ("Datatype", "Format") if element.get(k))


def weight_precisions(layer: dict) -> set:
    """Precisions of a layer's weights: 10.x "Weights": {"Type"}, 11.x may list them under "Constants"."""
    found = []
    weights = layer.get("Weights")
    if isinstance(weights, dict):
        found.append(str(weights.get("Type") or weights.get("Datatype") or ""))
    constants = layer.get("Constants")
    if isinstance(constants, dict):
        constants = list(constants.values()) if not ({"Type", "Datatype"} & set(constants)) else [constants]
    for c in constants if isinstance(constants, list) else []:
        if isinstance(c, dict):
            found.append(str(c.get("Type") or "") or tensor_format(c))
        elif isinstance(c, str):
            found.append(c)
    return {layer_precision(text) for text in found} - {None}


def check_engine_precision(trt, engine, io: list, precision: str, spec, opt_shape) -> dict:
    """An fp32 ONNX silently builds an fp32 engine: check the I/O and the convolutions' types.

    The ONNX graph's own types were checked before the build (weights and I/O in `precision`); this
    checks what TensorRT made of them. Layer formats of a dynamic engine read "N/A due to dynamic
    shapes" unless the inspector has a context with concrete shapes, so one is set at the opt shape.
    Convolutions inside Myelin regions show up as lower-case sub-layers with the ONNX name in
    "Metadata", hence the loose match; such a region is judged by its weights' type only, since its
    outputs may belong to a fused neighbour (an fp32-norm Cast) and would fail a correct engine.
    Regions without a weights type count as "unknown": the strongly typed network already had its
    convolution weights checked in the ONNX. A layer whose weights include `precision` passes (a bias
    or scale beside them may be kept wider). Returns the count of convolutions per type seen.
    """
    wanted = _PRECISION_TYPES[precision]
    wrong_io = [f"{t['name']}={t['dtype']}" for t in io if t["dtype"] != wanted]
    if wrong_io:
        raise ExportError(f"{spec.name} engine I/O is {wrong_io}, expected {wanted} for {precision}")
    # USER_MANAGED: the default strategy would allocate the largest activation memory of all profiles
    # just to read layer information; the inspector runs nothing, so no memory is ever set.
    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:
        raise ExportError(f"TensorRT could not create an execution context to inspect the {spec.name} engine "
                          "(see its log above; out of device memory?)")
    if not context.set_input_shape(spec.input_name, tuple(opt_shape)):
        raise ExportError(f"{spec.name} engine refused its own opt shape {opt_shape}")
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    counts: dict = {}
    off = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        what = " ".join(str(layer.get(k, "")) for k in ("LayerType", "ParameterType", "Name", "Metadata"))
        if not re.search(r"conv", what, re.IGNORECASE):
            continue
        weights = weight_precisions(layer)
        if weights:
            kinds = {precision} if precision in weights else weights
        elif re.search(r"convolution", str(layer.get("LayerType", "")) + str(layer.get("ParameterType", "")),
                       re.IGNORECASE):
            outputs = layer.get("Outputs") if isinstance(layer.get("Outputs"), list) else []
            kinds = {layer_precision(tensor_format(o)) for o in outputs} - {None}
        else:
            # A fused region that merely mentions a conv: its outputs may be a neighbour's (an fp32-norm Cast).
            kinds = set()
        for kind in kinds or {"unknown"}:
            counts[kind] = counts.get(kind, 0) + 1
        if kinds and precision not in kinds:
            off.append(layer.get("Name"))
    if off:
        raise ExportError(f"{spec.name} engine: {len(off)} convolution layers are not {precision}, e.g. {off[0]}")
    if not set(counts) - {"unknown"}:
        console.print(f"[yellow]! {spec.name} engine: the inspector showed no convolution types to check; "
                      "I/O types were checked, and the ONNX weights before the build[/]")
    return counts
