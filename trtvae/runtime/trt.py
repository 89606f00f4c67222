"""TensorRT backend: runs the plan files named in the manifest on torch CUDA tensors, with no host copies.

Kept thin: everything that can be decided without TensorRT (profile choice, batch limits,
compatibility, alignment) lives in pure-Python modules beside this one.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from ..manifest import component_bytes, component_file, engine_profiles, engines
from ..profiles import batch_ranges, describe_ranges, select_profile, spatial_limits
from .base import VaeRuntime
from .alignment import aligned, aligned_empty
from .engine_check import EngineMismatchError, check_engine, rebuild_command

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
    """One execution context bound to one profile, with its stream and its device memory."""

    context: object
    stream: torch.cuda.Stream
    memory: torch.Tensor | None = None


class ContextPool:
    """One holder per key, made on first use and kept, each behind its own lock.

    A TensorRT context is bound to one optimization profile and is not safe to use from two
    threads at once; a lock per context keeps callers correct while different components and
    profiles still overlap.
    """

    def __init__(self, factory):
        self._factory = factory  # key -> holder; called once per key
        self._items: dict = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def acquire(self, key):
        with self._guard:
            if key not in self._items:
                self._items[key] = (self._factory(key), threading.Lock())
            holder, lock = self._items[key]
        with lock:
            yield holder

    def __len__(self) -> int:
        return len(self._items)


class TRTVae(VaeRuntime):
    """The exported VAE as TensorRT engines. Same API as OrtVae (and diffusers' AutoencoderKL).

    Thread safety: one execution context per (component, profile), each behind a lock and with
    its own CUDA stream, so concurrent calls are correct; calls on the same engine and profile
    run one at a time (on one GPU they would queue anyway).

    Args:
        directory: the export folder (holding manifest.json and the .plan files it names).
        manifest: its parsed manifest; `from_pretrained(directory)` reads it for you.
        device: the CUDA device to run on ("cuda" means the current one).

    Attributes:
        profiles: {component: [{"min", "opt", "max"} input shapes]} of each engine, as the manifest says.
    """

    backend = "tensorrt"

    def __init__(self, directory, manifest: dict, device="cuda"):
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
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._engines: dict = {}
        self._engine_lock = threading.Lock()
        self._pool = ContextPool(self._new_slot)

    @property
    def device(self) -> torch.device:
        return self._device

    # --- hooks used by the shared base -----------------------------------------------
    def _batch_ranges(self, component: str, shape: tuple) -> list:
        ranges = batch_ranges(self.profiles.get(component, []), shape)
        return ranges or super()._batch_ranges(component, shape)

    def _spatial_limits(self, component: str):
        return spatial_limits(self.profiles[component]) if component in self.profiles else None

    def _exact_unavailable(self, component: str) -> str | None:
        # The export writes segment graphs as ONNX only; a runner for segment plans would be code that
        # nothing builds for. Until the export builds them, TRTVae tiles as diffusers does and says why.
        return super()._exact_unavailable(component) or (
            f"the export builds no TensorRT plans for the {component} segment graphs yet; OrtVae tiles "
            f"{self.directory} exactly")

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
            with self._pool.acquire((component, index)) as slot:
                # The slot's stream serializes every use of its context and memory on the GPU, even for
                # callers on different streams; the lock alone only orders the enqueues.
                slot.stream.wait_stream(caller)
                with torch.cuda.stream(slot.stream):
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
        component, index = key
        engine = self._engine(component)
        with torch.cuda.device(self._device):
            # USER_MANAGED: device memory is sized per call for the shapes in use (fully so where the
            # engine was built with RUNTIME_ACTIVATION_RESIZE_10_10), not always the profile max.
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for the {component} engine")
            # From torch's per-device pool: two slots may draw the same stream, which only serializes them.
            stream = torch.cuda.Stream(self._device)
            context.set_optimization_profile_async(index, stream.cuda_stream)
        return _Slot(context, stream)

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
