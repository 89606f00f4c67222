"""Build strongly typed TensorRT engines from the exported ONNX through Polygraphy.

Precision comes from the graph: no fp16/bf16 builder flags exist in TensorRT 11, and 10.x
gets the same behaviour from the STRONGLY_TYPED network flag. The plan file is written raw
(no header), so trtexec, Polygraphy, Triton and C++ load it as is; its metadata goes into
manifest.json.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..errors import ExportError
from ..files import atomic_path
from ..profiles import component_shapes
from .progress import console

TIMING_CACHE = "timing.cache"
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
        import tensorrt  # noqa: F401  (the libraries may be missing behind the bindings)
    except Exception as e:  # an ImportError or OSError from the native libraries
        return f"TensorRT does not import: {str(e).splitlines()[0][:120]}"
    return None


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
    pools = {}
    if options.workspace_gib:
        pools[trt.MemoryPoolType.WORKSPACE] = int(options.workspace_gib * 2**30)
    builder_config = CreateConfig(
        profiles=trt_profiles,
        preview_features=_preview_features(trt),
        builder_optimization_level=options.optimization_level,
        memory_pool_limits=pools or None,
        load_timing_cache=str(cache) if cache.exists() else None,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,  # lets the precision check read layer types
        progress_monitor=_progress_monitor(trt),
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    start = time.perf_counter()
    try:
        plan = EngineBytesFromNetwork(network, config=builder_config, save_timing_cache=str(cache))()
    except PolygraphyException as e:  # Polygraphy raises on parse and build failures
        raise ExportError(f"TensorRT failed to build the {spec.name} engine: {str(e).strip()[:300]}") from e
    build_seconds = time.perf_counter() - start
    data = bytes(plan)
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(data)

    trt_logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(data)
    io = describe_engine_io(trt, engine)
    conv_types = check_engine_precision(trt, engine, io, precision, spec, shapes[0]["opt"])
    major, minor = torch.cuda.get_device_capability()
    return {
        "file": plan_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
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


def check_engine_precision(trt, engine, io: list, precision: str, spec, opt_shape) -> dict:
    """An fp32 ONNX silently builds an fp32 engine: check the I/O and the convolutions' types.

    The ONNX graph's own types were checked before the build (weights and I/O in `precision`); this
    checks what TensorRT made of them. Layer formats of a dynamic engine read "N/A due to dynamic
    shapes" unless the inspector has a context with concrete shapes, so one is set at the opt shape.
    Convolutions inside Myelin regions show up as lower-case sub-layers with the ONNX name in
    "Metadata", hence the loose match; such a region is judged by its weights' type only, since its
    outputs may belong to a fused neighbour (an fp32-norm Cast) and would fail a correct engine.
    Regions without a weights type count as "unknown": the strongly typed network already had its
    convolution weights checked in the ONNX. Returns the count of convolutions per type seen.
    """
    wanted = _PRECISION_TYPES[precision]
    wrong_io = [f"{t['name']}={t['dtype']}" for t in io if t["dtype"] != wanted]
    if wrong_io:
        raise ExportError(f"{spec.name} engine I/O is {wrong_io}, expected {wanted} for {precision}")
    context = engine.create_execution_context()
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
        weights = layer.get("Weights", {}).get("Type", "") if isinstance(layer.get("Weights"), dict) else ""
        if layer_precision(str(weights)):
            kinds = {layer_precision(str(weights))}
        elif re.search(r"convolution", str(layer.get("LayerType", "")) + str(layer.get("ParameterType", "")),
                       re.IGNORECASE):
            kinds = {layer_precision(str(o.get("Format/Datatype", ""))) for o in layer.get("Outputs", [])} - {None}
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
