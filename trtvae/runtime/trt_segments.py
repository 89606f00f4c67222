"""TensorRT's part of exact tiling: run one segment plan (written against TensorRT 10/11's documented API).

Never run here: no GPU or TensorRT on the machines this was written on. The export does not build
segment plans yet, so a TRTVae tiles exactly only where the manifest's segment steps carry an
"engine" entry ({"file", "sha256"}); elsewhere it blends as diffusers does and says why.
"""
from __future__ import annotations

import threading

import torch

from ..manifest import segment_bytes
from .buffers import aligned, aligned_empty


class TrtSegmentsMixin:
    """`_run_segment` on per-segment TensorRT plans: one engine, context and lock per segment."""

    def _exact_unavailable(self, component: str) -> str | None:
        reason = super()._exact_unavailable(component)
        if reason is None and any("engine" not in s for s in
                                  self.manifest["components"][component]["segments"]["steps"]):
            reason = (f"{self.directory} has {component} segment graphs but no TensorRT plans for them "
                      "(the export does not build segment engines yet); OrtVae tiles this folder exactly")
        return reason

    def _segment_context(self, component: str, step):
        import tensorrt as trt

        cache = self.__dict__.setdefault("_segment_contexts", {})
        lock = self.__dict__.setdefault("_segment_lock", threading.Lock())
        key = (component, step.index)
        with lock, torch.cuda.device(self._device):
            if key not in cache:
                runtime = trt.Runtime(self._trt_logger)
                runtime.engine_host_code_allowed = False  # a plan is code: never run host code from one
                engine = runtime.deserialize_cuda_engine(
                    segment_bytes(self.directory, self.manifest, component, step.index, key="engine"))
                if engine is None:
                    raise RuntimeError(f"TensorRT could not deserialize the plan of {component} segment {step.name}")
                context = engine.create_execution_context()
                if context is None:
                    raise RuntimeError(f"TensorRT could not create a context for {component} segment {step.name}")
                cache[key] = (engine, context, threading.Lock())
            return cache[key]

    def _run_segment(self, component: str, step, inputs: dict) -> torch.Tensor:
        _, context, lock = self._segment_context(component, step)
        source_device = inputs["x"].device
        with lock, torch.cuda.device(self._device):
            stream = torch.cuda.current_stream(self._device)
            # The runtime hands each input in the dtype the manifest lists for it (stats and activations float32).
            feed = {name: aligned(t.to(self._device).contiguous()) for name, t in inputs.items()}
            for name, t in feed.items():
                if not context.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"TensorRT refused shape {tuple(t.shape)} for {name!r} of segment {step.name}")
            out = aligned_empty(tuple(context.get_tensor_shape("y")), torch.float32, self._device)
            for name, t in (*feed.items(), ("y", out)):
                if not context.set_tensor_address(name, t.data_ptr()):
                    raise RuntimeError(f"TensorRT refused the address of {name!r} of segment {step.name}")
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed for segment {step.name}")
        return out.to(source_device)
