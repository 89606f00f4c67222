"""ONNX Runtime backend: runs the exported ONNX files on CPU, or CUDA where onnxruntime-gpu is installed."""
from __future__ import annotations

import threading

import numpy as np
import torch

from ..manifest import component_file, segment_bytes
from .base import VaeRuntime

# The manifest dtypes ONNX Runtime can run: numpy has no bfloat16, and ONNX Runtime no bf16 convolution kernels.
ORT_DTYPES = ("float32", "float16")


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            "OrtVae needs ONNX Runtime: `pip install onnxruntime` (CPU) or `pip install onnxruntime-gpu` (CUDA)"
        ) from e
    return onnxruntime


_arena_lock = threading.Lock()
_arena_shared: bool | None = None  # registering twice is harmless, but once is enough


def _share_cpu_arena(ort) -> bool:
    """Register one CPU arena in ONNX Runtime's environment, once per process; False where that fails."""
    global _arena_shared
    with _arena_lock:
        if _arena_shared is None:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            try:  # extend by what is asked (1), not to the next power of two: the arena stays near one window's peak
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
                _arena_shared = True
            except Exception:  # noqa: BLE001 - an ONNX Runtime build without it: sessions go without an arena
                _arena_shared = False
        return _arena_shared


class OrtVae(VaeRuntime):
    """The exported VAE on ONNX Runtime. Sessions are created on first use of each component.

    Args:
        directory: the export folder (holding manifest.json and the .onnx files it names).
        manifest: its parsed manifest; `from_pretrained(directory)` reads it for you.
        providers: ONNX Runtime execution providers in order of preference; None takes CUDA where
            onnxruntime-gpu offers it, else the CPU.
        session_options: an `onnxruntime.SessionOptions` for every session.
    """

    backend = "onnxruntime"

    def __init__(self, directory, manifest: dict, providers=None, session_options=None):
        super().__init__(directory, manifest)
        ort = _ort()
        if manifest["io_dtype"] not in ORT_DTYPES:
            raise ValueError(
                f"OrtVae runs fp32 and fp16 exports; this export is {manifest['precision']} "
                "(ONNX Runtime has no bf16 convolution kernels): load it with TRTVae"
            )
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.providers = list(providers)
        self._session_options = session_options
        self._sessions: dict = {}
        self._numpy_dtype = np.dtype(manifest["io_dtype"])  # of every input and output (the base casts to it)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda") if self._on_cuda else torch.device("cpu")

    @property
    def _on_cuda(self) -> bool:
        first = self.providers[0] if self.providers else None
        return (first[0] if isinstance(first, tuple) else first) == "CUDAExecutionProvider"

    def _session(self, component: str):
        session = self._sessions.get(component)
        if session is None:
            path = component_file(self.directory, self.manifest, component)
            session = _ort().InferenceSession(str(path), self._session_options, providers=self.providers)
            self._sessions[component] = session
        return session

    def _run(self, component: str, x: torch.Tensor) -> torch.Tensor:
        spec = self._specs[component]
        session = self._session(component)
        if x.is_cuda and self._on_cuda:
            return self._run_cuda(session, spec, x)
        y = session.run([spec.output_name], {spec.input_name: x.cpu().numpy()})[0]
        return torch.from_numpy(y).to(x.device)

    def _segment_options(self):
        """Dozens of segment sessions run one after another: without spinning, an idle session's threads do
        not take the cores from the one running; one arena shared by all of them reuses one window's memory
        (an arena each would hold every segment's peak; none at all page-faults every window's buffers in
        afresh: measured at 1024², 4× the page faults and 1.3× the CPU time of the shared arena)."""
        if self._session_options is not None:
            return self._session_options
        ort = _ort()
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if _share_cpu_arena(ort):
            options.add_session_config_entry("session.use_env_allocators", "1")
        else:
            options.enable_cpu_mem_arena = False
        return options

    def _run_segment(self, component: str, step, inputs: dict) -> torch.Tensor:
        key = (component, step.index)
        session = self._sessions.get(key)
        if session is None:  # the bytes checked against the manifest are the bytes loaded
            data = segment_bytes(self.directory, self.manifest, component, step.index)
            session = _ort().InferenceSession(data, self._segment_options(), providers=self.providers)
            self._sessions[key] = session
        device = inputs["x"].device
        feed = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
        return torch.from_numpy(session.run(["y"], feed)[0]).to(device)

    def _run_cuda(self, session, spec, x: torch.Tensor) -> torch.Tensor:
        # Bind torch's buffers directly so CUDA tensors never round-trip through the host.
        out = torch.empty(spec.output_shape(tuple(x.shape)), dtype=x.dtype, device=x.device)
        binding = session.io_binding()
        index = x.device.index or 0
        binding.bind_input(spec.input_name, "cuda", index, self._numpy_dtype, tuple(x.shape), x.data_ptr())
        binding.bind_output(spec.output_name, "cuda", index, self._numpy_dtype, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        session.run_with_iobinding(binding)
        return out
