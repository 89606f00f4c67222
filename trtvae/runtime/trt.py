"""TensorRT backend: runs the plan files named in the manifest on torch CUDA tensors, with no host copies.

Kept thin: everything that can be decided without TensorRT (profile choice, batch limits,
compatibility, alignment) lives in pure-Python modules beside this one.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch

from ..manifest import component_bytes, engine_profiles, engines, segment_bytes, segment_plans
from ..precision import torch_dtype
from ..profiles import batch_ranges, contains, describe_ranges, largest_core, select_profile, spatial_limits
from .alignment import aligned, aligned_empty
from .base import VaeRuntime
from .engine_check import EngineMismatchError, check_engine, rebuild_command
from .segments import resolution_ratios

EXACT_BOUNDARIES = ("device", "host")  # where exact tiling keeps the whole-image tensors between segments

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


def _label(plan) -> str:
    """A plan key in words: "decoder engine", or "decoder segment 3 plan" for (component, step)."""
    return f"{plan[0]} segment {plan[1]} plan" if isinstance(plan, tuple) else f"{plan} engine"


@dataclass
class _Slot:
    """One execution context bound to one profile, with its stream."""

    context: object
    stream: torch.cuda.Stream


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

    Thread safety: one execution context per (plan, profile), each behind a lock and with its own
    CUDA stream, so concurrent calls are correct; calls on the same plan and profile run one at a
    time (on one GPU they would queue anyway).

    Args:
        directory: the export folder (holding manifest.json and the .plan files it names).
        manifest: its parsed manifest; `from_pretrained(directory)` reads it for you.
        device: the CUDA device to run on ("cuda" means the current one).
        exact_boundaries: where exact tiling keeps the whole-image activations between segment plans:
            "device" (GPU memory, fastest) or "host" (CPU memory: the GPU then holds about one window
            of each segment at a time, whatever the image size).

    Attributes:
        profiles: {component: [{"min", "opt", "max"} input shapes]} of each engine, as the manifest says.
    """

    backend = "tensorrt"

    def __init__(self, directory, manifest: dict, device="cuda", exact_boundaries: str = "device"):
        if exact_boundaries not in EXACT_BOUNDARIES:
            raise ValueError(f"TRTVae(exact_boundaries={exact_boundaries!r}): expected one of "
                             f"{', '.join(map(repr, EXACT_BOUNDARIES))} (GPU or CPU memory for exact tiling's "
                             "whole-image tensors between segments)")
        self.exact_boundaries = exact_boundaries
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
        segment_entries = {f"{name} segment {i}": plan for name in manifest["components"]
                           for i, plan in enumerate(segment_plans(manifest, name) or [])}
        for name, entry in {**entries, **segment_entries}.items():  # before any plan is deserialized
            check_engine(name, entry, trt.__version__, f"{major}.{minor}", manifest, directory)
        self.profiles = {name: engine_profiles(entry, self._specs[name].input_name) for name, entry in entries.items()}
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._engines: dict = {}
        self._engine_lock = threading.Lock()
        self._pool = ContextPool(self._new_slot)
        self._uploads = threading.local()

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
        if (why := super()._exact_unavailable(component)) is not None:
            return why
        if segment_plans(self.manifest, component) is None:
            failed = self.manifest["components"][component]["segments"].get("plans_error")
            if failed:
                return (f"the export could not build TensorRT plans for the {component} segment graphs ({failed}); "
                        f"OrtVae tiles {self.directory} exactly")
            return (f"{self.directory} holds {component} segment graphs but no TensorRT plans for them (exported "
                    "where engines were not built, or by an older trtvae): re-export with --engines required for "
                    "exact tiling on TensorRT; OrtVae tiles this folder exactly")
        return None

    def _exact_core(self, component: str) -> int:
        """The tile's core, shrunk where its windows would exceed the segment plans' (a larger tile asked for)."""
        steps = self._segment_steps(component)
        plans = segment_plans(self.manifest, component)
        ratios = resolution_ratios(steps)
        tiled = [(ratios[s.index], s.halo, s.align, min(plans[s.index]["profiles"][0]["x"]["max"][2:]))
                 for s in steps if s.kind == "tiled"]
        return largest_core(super()._exact_core(component), tiled)

    def _boundary_device(self, x: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.exact_boundaries == "host" else self._device

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
        out = self._execute(component, index, {spec.input_name: x}, spec.output_name, self.dtype)
        return out.to(x.device)

    def _run_segment(self, component: str, step, inputs: dict) -> torch.Tensor:
        """Run a segment plan; batches beyond its profile run in parts, as do an attention step's query rows."""
        entry = self.manifest["components"][component]["segments"]["steps"][step.index]
        limits = entry["engine"]["profiles"][0]
        io_types = {t["name"]: torch_dtype(t["dtype"]) for t in entry["inputs"] + entry["outputs"]}
        batch = limits["x"]["max"][0]
        if "kv" in inputs:  # every query chunk of one attention step reads the same keys and values
            inputs = {**inputs, "kv": self._uploaded(inputs["kv"])}
        parts = []
        for b0 in range(0, inputs["x"].shape[0], batch):
            part = {name: t[b0:b0 + batch] for name, t in inputs.items()}
            height = part["x"].shape[2]
            span = min(height, limits["x"]["max"][2]) if step.kind == "attention" else height
            rows = []
            for r0 in range(0, height, span):  # softmax rows are independent: exact in any chunks
                feed = {n: t if n == "kv" or span == height else t[:, :, r0:r0 + span] for n, t in part.items()}
                outside = [f"{n} {tuple(t.shape)} is outside min {limits[n]['min']} max {limits[n]['max']}"
                           for n, t in feed.items() if not contains(limits[n], t.shape)]
                if outside:
                    raise ValueError(
                        f"{component} segment {step.index} ({step.name}): {'; '.join(outside)} of its TensorRT plan; "
                        "exact tiling on TensorRT takes images up to the side the export built its plans for "
                        "(trtvae.defaults.EXACT_MAX_IMAGE_SIDE); OrtVae takes any size")
                rows.append(self._execute((component, step.index), 0, {n: t.to(dtype=io_types[n]) for n, t in
                                                                       feed.items()}, "y", io_types["y"]))
            parts.append(torch.cat(rows, dim=2) if len(rows) > 1 else rows[0])
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).to(inputs["x"].device)

    def _uploaded(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the GPU, copied once per tensor and thread (host boundaries), freed with the original."""
        if t.device == self._device:
            return t
        cache = self._uploads.__dict__
        if cache.get("source") is None or cache["source"]() is not t:
            cache.clear()
            cache["source"] = weakref.ref(t, lambda _: cache.clear())
            cache["copy"] = t.to(self._device)
        return cache["copy"]

    # --- TensorRT calls ----------------------------------------------------------------
    def _plan(self, plan) -> tuple:
        """(manifest entry, checked bytes) of a plan: a component's engine, or (component, step) of a segment."""
        if isinstance(plan, tuple):
            component, index = plan
            entry = self.manifest["components"][component]["segments"]["steps"][index]["engine"]
            return entry, segment_bytes(self.directory, self.manifest, component, index, key="engine")
        return engines(self.manifest)[plan], component_bytes(self.directory, self.manifest, plan, key="engine")

    def _engine(self, plan):
        with self._engine_lock, torch.cuda.device(self._device):
            engine = self._engines.get(plan)
            if engine is None:
                entry, data = self._plan(plan)  # the bytes hashed are the bytes deserialized
                runtime = trt.Runtime(self._trt_logger)
                runtime.engine_host_code_allowed = False  # a plan is code: never run host code from one
                engine = runtime.deserialize_cuda_engine(data)
                del data
                if engine is None:
                    raise EngineMismatchError(
                        f"TensorRT could not deserialize {self.directory / entry['file']} (see its log above). "
                        f"Rebuild: {rebuild_command(self.manifest, self.directory)}"
                    )
                self._engines[plan] = engine
        return engine

    def _new_slot(self, key) -> _Slot:
        plan, index = key
        engine = self._engine(plan)
        with torch.cuda.device(self._device):
            # USER_MANAGED: device memory is sized per call for the shapes in use (fully so where the
            # engine was built with RUNTIME_ACTIVATION_RESIZE_10_10), not always the profile max.
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for the {_label(plan)}")
            # From torch's per-device pool: two slots may draw the same stream, which only serializes them.
            stream = torch.cuda.Stream(self._device)
            context.set_optimization_profile_async(index, stream.cuda_stream)
        return _Slot(context, stream)

    def _execute(self, plan, index: int, inputs: dict, output: str, dtype: torch.dtype) -> torch.Tensor:
        """Run `plan` (a component, or (component, step) of a segment) at profile `index`; return its output.

        The output lives on the GPU; its shape is the context's once the input shapes are set.
        """
        with torch.cuda.device(self._device):  # TensorRT works on the current device, not the inputs'
            caller = torch.cuda.current_stream(self._device)
            # Slices and batch chunks arrive as offset views; TensorRT reads I/O at 256-byte aligned addresses.
            inputs = {name: aligned(t.to(self._device, non_blocking=True)) for name, t in inputs.items()}
            with self._pool.acquire((plan, index)) as slot:
                shape = self._set_shapes(slot, plan, inputs, output)
                # Output and execution memory come from the caller's stream, which frees them after the slot's
                # stream is done: dozens of segment contexts run one after another and hold none of it between
                # calls, and torch's cache hands one context's freed memory to the next.
                out = aligned_empty(shape, dtype, self._device)
                memory = self._execution_memory(slot, plan)
                # The slot's stream serializes every use of its context on the GPU, even for callers on
                # different streams; the lock alone only orders the enqueues.
                slot.stream.wait_stream(caller)
                with torch.cuda.stream(slot.stream):
                    self._enqueue(slot, plan, {**inputs, output: out}, memory)
                caller.wait_stream(slot.stream)
        return out

    @staticmethod
    def _set_shapes(slot: _Slot, plan, inputs: dict, output: str) -> tuple:
        context = slot.context
        for name, t in inputs.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"TensorRT refused shape {tuple(t.shape)} for {name!r} of the {_label(plan)}")
        shape = tuple(context.get_tensor_shape(output))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT left output {output!r} of the {_label(plan)} unresolved: {shape}")
        return shape

    def _execution_memory(self, slot: _Slot, plan) -> torch.Tensor:
        """The context's scratch memory for the shapes just set (USER_MANAGED), from torch's allocator."""
        context = slot.context
        need = context.update_device_memory_size_for_shapes()
        if need <= 0:
            raise RuntimeError(f"TensorRT could not size device memory for the {_label(plan)}")
        return torch.empty(need, dtype=torch.uint8, device=self._device)

    @staticmethod
    def _enqueue(slot: _Slot, plan, tensors: dict, memory: torch.Tensor) -> None:
        """Run one inference on the slot's stream (the current stream when called), shapes already set."""
        context = slot.context
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: pointer and size, set every call
            context.set_device_memory(memory.data_ptr(), memory.numel())
        else:
            context.device_memory = memory.data_ptr()
        if not all(context.set_tensor_address(name, t.data_ptr()) for name, t in tensors.items()):
            raise RuntimeError(f"TensorRT refused the I/O addresses of the {_label(plan)}")
        if not context.execute_async_v3(slot.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for the {_label(plan)}")
