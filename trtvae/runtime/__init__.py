"""Runtime: load an export folder and run it behind diffusers' AutoencoderKL API.

Never imports `trtvae.export`, so a deployment can ship the runtime alone.
"""
from .base import VaeRuntime
from .ort import OrtVae

__all__ = ["VaeRuntime", "OrtVae", "TRTVae"]


def __getattr__(name):
    if name == "TRTVae":
        from .trt import TRTVae

        return TRTVae
    raise AttributeError(name)
