"""TensorRT backend: runs the plan files named in the manifest on torch CUDA tensors, with no host copies.

Kept thin: everything that can be decided without TensorRT (profile choice, batch limits,
compatibility, context sharing) lives in pure-Python modules beside this one.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from .. import defaults
from ..manifest import component_bytes, component_file, engine_profiles, engines
from ..profiles import batch_ranges, describe_ranges, select_profile, spatial_limits
from .base import VaeRuntime
from .buffers import aligned, aligned_empty, graph_buffers
from .contexts import ContextPool
from .engine_check import EngineMismatchError, check_engine, rebuild_command
from .streams import CaptureGate, StreamSet
from .trt_segments import TrtSegmentsMixin


trt = None  # the tensorrt module, imported when a TRTVae is made: `import trtvae` must work without it


def import_tensorrt():
    global trt
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(
            "TRTVae needs TensorRT 10.x or 11.x with a CUDA GPU: `pip install tensorrt` (or tensorrt-cu12 / "
            "tensorrt-cu13 to match your CUDA). OrtVae runs the same export folder without it."
        ) from e
    return trt


@dataclass
class _Slot:
    """One execution context bound to one profile, with its own stream and device memory.

    With CUDA graphs a slot also holds one graph captured for one shape: TensorRT ties a graph
    to the context state it was captured in, so a graph never shares its context.
    """

    context: object
    stream: torch.cuda.Stream
    memory: torch.Tensor | None = None
    graph: tuple | None = None  # (CUDAGraph, static input, static output)


def slot_bytes(slot: _Slot) -> int:
    """Device memory a slot pins: its execution memory and, with a graph, the graph's static I/O."""
    size = slot.memory.numel() if slot.memory is not None else 0
    if slot.graph is not None:
        size += sum(t.numel() * t.element_size() for t in slot.graph[1:])
    return size


def graph_memory_budget(free_bytes: int, fraction: float = defaults.GRAPH_MEMORY_FRACTION) -> int:
    """Bytes all CUDA-graph slots of one TRTVae may pin together.

    Below TensorRT 10.10 (or without RUNTIME_ACTIVATION_RESIZE_10_10 in the engine) every slot's memory
    is its profile's maximum whatever the shape, so 16 slots of a 4×1536² profile can fill a GPU.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"graph memory fraction {fraction}: expected a number in (0, 1]")
    return int(free_bytes * fraction)


# Process-wide, as torch's stream pool and a capture's reach are: every TRTVae's enqueues pause while
# any of them captures, and slots of all instances on a device draw distinct streams.
_GATE = CaptureGate()
_STREAM_SETS: dict = {}
_STREAM_SETS_GUARD = threading.Lock()


def _give_back_all(streams: StreamSet, taken: list) -> None:
    for stream in taken:
        streams.give_back(stream)
    taken.clear()


def _stream_set(device: torch.device) -> StreamSet:
    with _STREAM_SETS_GUARD:
        if device.index not in _STREAM_SETS:
            _STREAM_SETS[device.index] = StreamSet(lambda: torch.cuda.Stream(device))
        return _STREAM_SETS[device.index]


class TRTVae(TrtSegmentsMixin, VaeRuntime):
    """The exported VAE as TensorRT engines. Same API as OrtVae (and diffusers' AutoencoderKL).

    Thread safety: one execution context per (component, profile), each behind a lock and with
    its own CUDA stream, so concurrent calls are correct; calls on the same engine and profile
    run one at a time. With `cuda_graphs=True` there is one context and graph per shape
    (at most `defaults.GRAPH_SLOTS`, and together at most `graph_memory_bytes`; least recently
    used dropped first).

    Args:
        directory: the export folder (holding manifest.json and the .plan files it names).
        manifest: its parsed manifest; `from_pretrained(directory)` reads it for you.
        device: the CUDA device to run on ("cuda" means the current one).
        cuda_graphs: capture and replay one CUDA graph per repeated input shape.
        graph_memory_bytes: device memory all graph slots may pin together; default
            `defaults.GRAPH_MEMORY_FRACTION` of the memory free when the TRTVae is made. The budget is
            per instance: with several TRTVae on one GPU (Triton's --instances), pass a share to each.

    Attributes:
        profiles: {component: [{"min", "opt", "max"} input shapes]} of each engine, as the manifest says.
    """

    backend = "tensorrt"

    def __init__(self, directory, manifest: dict, device="cuda", cuda_graphs: bool = False,
                 graph_memory_bytes: int | None = None):
        super().__init__(directory, manifest)
        import_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("TRTVae needs a CUDA GPU and torch sees none; OrtVae runs this folder on the CPU")
        self._device = torch.device(device)
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        major, minor = torch.cuda.get_device_capability(self._device)
        entries = engines(manifest)
        if not entries:
            raise EngineMismatchError(
                f"{directory} has no TensorRT engines (it was exported where TensorRT or a GPU was missing). "
                f"Build them: {rebuild_command(manifest, directory)}"
            )
        for name, entry in entries.items():  # before any plan is deserialized
            check_engine(name, entry, trt.__version__, f"{major}.{minor}", manifest, directory)
        self.profiles = {name: engine_profiles(entry, self._specs[name].input_name) for name, entry in entries.items()}
        self.cuda_graphs = cuda_graphs
        if graph_memory_bytes is not None and graph_memory_bytes <= 0:
            raise ValueError(f"graph_memory_bytes={graph_memory_bytes}: expected a positive number of bytes")
        if cuda_graphs and graph_memory_bytes is None:
            graph_memory_bytes = graph_memory_budget(torch.cuda.mem_get_info(self._device)[0])
        self.graph_memory_bytes = graph_memory_bytes if cuda_graphs else None
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._engines: dict = {}
        self._engine_lock = threading.Lock()
        self._streams = _stream_set(self._device)
        self._taken: list = []  # this instance's streams, handed back when it is collected
        weakref.finalize(self, _give_back_all, self._streams, self._taken)
        # With CUDA graphs a slot per shape; each pins its memory, so the least recently used go first.
        self._pool = ContextPool(self._new_slot, max_items=defaults.GRAPH_SLOTS if cuda_graphs else None,
                                 max_bytes=self.graph_memory_bytes, size_of=slot_bytes, on_evict=self._drop_slot)

    @property
    def device(self) -> torch.device:
        return self._device

    # --- hooks used by the shared base -----------------------------------------------
    def _batch_ranges(self, component: str, shape: tuple) -> list:
        ranges = batch_ranges(self.profiles.get(component, []), shape)
        return ranges or super()._batch_ranges(component, shape)

    def _spatial_limits(self, component: str):
        return spatial_limits(self.profiles[component]) if component in self.profiles else None

    def _run(self, component: str, x: torch.Tensor) -> torch.Tensor:
        spec = self._specs[component]
        if component not in self.profiles:
            raise ValueError(f"this export has no {component} engine; it has: {sorted(self.profiles)}")
        shape = tuple(x.shape)
        index = select_profile(self.profiles[component], shape)
        if index is None:
            raise ValueError(
                f"{component} input {spec.input_name!r}: shape {shape} is outside every engine profile "
                f"({describe_ranges(self.profiles[component])}); enable tiling or rebuild with a wider --profile"
            )
        source_device = x.device
        with torch.cuda.device(self._device):  # TensorRT works on the current device, not x's
            caller = torch.cuda.current_stream(self._device)
            # Slices and batch chunks arrive as offset views; TensorRT reads I/O at 256-byte aligned addresses.
            x = aligned(x.to(self._device, non_blocking=True))
            out = aligned_empty(spec.output_shape(shape), self.dtype, self._device)
            key = (component, index, shape) if self.cuda_graphs else (component, index)
            with self._pool.acquire(key) as slot:
                if self.cuda_graphs and slot.graph is None:
                    self._capture(slot, spec, x, out, caller)
                with _GATE.enqueue():
                    # The slot's own stream serializes every use of its context and memory on the GPU, even
                    # for callers on different streams; the lock alone only orders the enqueues.
                    slot.stream.wait_stream(caller)
                    with torch.cuda.stream(slot.stream):
                        if self.cuda_graphs:
                            self._replay(slot, x, out)
                        else:
                            self._enqueue(slot, spec, x, out)
                    caller.wait_stream(slot.stream)
        return out.to(source_device)

    # --- TensorRT calls ----------------------------------------------------------------
    def _engine(self, component: str):
        with self._engine_lock, torch.cuda.device(self._device):
            engine = self._engines.get(component)
            if engine is None:
                path = component_file(self.directory, self.manifest, component, key="engine", check_hash=False)
                plan = component_bytes(self.directory, self.manifest, component, key="engine")  # the bytes hashed
                runtime = trt.Runtime(self._trt_logger)
                runtime.engine_host_code_allowed = False  # a plan is code: never run host code from one
                engine = runtime.deserialize_cuda_engine(plan)
                del plan
                if engine is None:
                    raise EngineMismatchError(
                        f"TensorRT could not deserialize {path} (see its log above). "
                        f"Rebuild: {rebuild_command(self.manifest, self.directory)}"
                    )
                self._engines[component] = engine
        return engine

    def _new_slot(self, key) -> _Slot:
        component, index = key[:2]
        engine = self._engine(component)
        with torch.cuda.device(self._device):
            # USER_MANAGED: device memory is sized per call for the shapes in use (fully so where the
            # engine was built with RUNTIME_ACTIVATION_RESIZE_10_10), not always the profile max.
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for the {component} engine")
            stream = self._streams.take()
            self._taken.append(stream)
            context.set_optimization_profile_async(index, stream.cuda_stream)
        return _Slot(context, stream)

    def _drop_slot(self, slot: _Slot) -> None:
        slot.stream.synchronize()  # its GPU work may still run on its memory
        self._streams.give_back(slot.stream)
        self._taken.remove(slot.stream)

    def _enqueue(self, slot: _Slot, spec, x: torch.Tensor, out: torch.Tensor) -> None:
        """Run one inference on the slot's stream (the current stream when called)."""
        context = slot.context
        shape = tuple(x.shape)
        if not context.set_input_shape(spec.input_name, shape):
            raise ValueError(f"TensorRT refused shape {shape} for {spec.input_name!r}")
        need = context.update_device_memory_size_for_shapes()
        if need <= 0:
            raise RuntimeError(f"TensorRT could not size device memory for {spec.name} at {shape}")
        if slot.memory is None or slot.memory.numel() < need:
            slot.memory = torch.empty(need, dtype=torch.uint8, device=self._device)
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: pointer and size, set every call
            context.set_device_memory(slot.memory.data_ptr(), slot.memory.numel())
        else:
            context.device_memory = slot.memory.data_ptr()
        if not (context.set_tensor_address(spec.input_name, x.data_ptr())
                and context.set_tensor_address(spec.output_name, out.data_ptr())):
            raise RuntimeError(f"TensorRT refused the I/O addresses of the {spec.name} engine")
        if not context.execute_async_v3(slot.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {spec.name} at shape {shape}")

    def _capture(self, slot: _Slot, spec, x: torch.Tensor, out: torch.Tensor, caller) -> None:
        """Capture the slot's CUDA graph for this shape, after one normal run."""
        static_in, static_out = graph_buffers(x, out)  # usable under no_grad after an inference_mode capture
        with _GATE.enqueue():
            slot.stream.wait_stream(caller)  # static_in was filled on the caller's stream
            with torch.cuda.stream(slot.stream):
                # TensorRT defers shape-dependent setup to the next enqueue, which must not happen inside
                # the capture.
                self._enqueue(slot, spec, static_in, static_out)
        slot.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # The gate: no slot launches work while a capture runs (a slot may share this stream, see
        # streams.py), and one capture at a time (torch's allocator and RNG are device-wide during one).
        # thread_local: other threads' CUDA calls during it must not invalidate it.
        with _GATE.capture(), torch.cuda.graph(graph, stream=slot.stream, capture_error_mode="thread_local"):
            captured = slot.context.execute_async_v3(slot.stream.cuda_stream)
        if not captured:
            raise RuntimeError(f"TensorRT execution failed while capturing {spec.name} at {tuple(x.shape)}")
        slot.graph = (graph, static_in, static_out)

    def _replay(self, slot: _Slot, x: torch.Tensor, out: torch.Tensor) -> None:
        """Replay the slot's graph on its stream (the current stream when called)."""
        graph, static_in, static_out = slot.graph
        static_in.copy_(x)
        graph.replay()
        out.copy_(static_out)
