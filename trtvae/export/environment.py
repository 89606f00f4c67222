"""What this machine can build engines with: TensorRT, Polygraphy, a CUDA GPU and one TensorRT builder.

Probed here only: `vae-export` (its option check, its engine stage, each build) and `doctor` read
the same answer. The builder is created once per imported TensorRT module and kept: every engine
build of the process parses its network into it, so an export and a `doctor` each create one.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

from ..errors import first_line


@dataclass(frozen=True)
class Probe:
    tensorrt: str | None  # version, None where it is missing or does not import
    tensorrt_error: str | None  # "not installed" or "does not import (...)"
    polygraphy: str | None  # version, "does not import (...)", or None where not installed
    gpu: bool  # a CUDA GPU is visible to torch
    builder: object | None  # the process's trt.Builder, None where there is none
    builder_status: str | None  # "ok", why no builder, or None where none was tried

    @property
    def why_not(self) -> str | None:
        """Why engines cannot be built here, in a few words; None when they can."""
        if self.tensorrt_error == "not installed":
            return "TensorRT is not installed (pip install tensorrt, or the .[gpu] extra)"
        if self.polygraphy is None:
            return "Polygraphy is not installed (pip install polygraphy)"
        if self.polygraphy.startswith("does not import"):
            return f"Polygraphy {self.polygraphy}"
        if not self.gpu:
            return "no CUDA GPU is visible to torch"
        if self.tensorrt_error:
            return f"TensorRT {self.tensorrt_error}"
        return None if self.builder is not None else self.builder_status


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e, 160)}" if str(e).strip() else type(e).__name__


def probe() -> Probe:
    """Import TensorRT and Polygraphy where installed and, with a GPU, get the process's builder."""
    import torch

    version, error, builder, status = None, None, None, None
    trt = None
    if importlib.util.find_spec("tensorrt") is None:
        error = "not installed"
    else:
        try:
            import tensorrt as trt
        except Exception as e:  # an ImportError or OSError from the native libraries behind the bindings
            error = f"does not import ({_error(e)})"
        else:
            version = getattr(trt, "__version__", "?")
    polygraphy = None
    if importlib.util.find_spec("polygraphy") is not None:
        try:
            import polygraphy as pg

            polygraphy = getattr(pg, "__version__", "?")
        except Exception as e:
            polygraphy = f"does not import ({_error(e)})"
    gpu = torch.cuda.is_available()
    if trt is not None:
        builder, status = _builder(trt) if gpu else (None, "not tried: no CUDA GPU")
    return Probe(version, error, polygraphy, gpu, builder, status)


@functools.cache
def _builder(trt) -> tuple:
    """The builder every build of this process uses, or (None, why not).

    A driver too old for the TensorRT build fails only here, as a TypeError from the bindings'
    constructor, so the build would crash instead of being skipped with a reason.
    """
    version = getattr(trt, "__version__", "?")
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    except Exception as e:
        return None, (f"TensorRT {version} cannot create a builder on this machine ({_error(e)}); "
                      "is the NVIDIA driver recent enough for this TensorRT build?")
    if not builder:
        return None, f"TensorRT {version} returned no builder (see its log above)"
    return builder, "ok"


def engines_unavailable_reason() -> str | None:
    """Why engines cannot be built here, in a few words; None when they can."""
    return probe().why_not
