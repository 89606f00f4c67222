"""trtvae: the SDXL VAE (any diffusers AutoencoderKL) as ONNX and TensorRT, behind diffusers' API."""
__version__ = "0.1.0"

__all__ = ["OrtVae", "TRTVae", "VaeRuntime", "attach", "__version__"]


def __getattr__(name):
    # Lazy, so `vae-export --help` and `import trtvae` stay fast and never need TensorRT.
    if name in ("OrtVae", "TRTVae", "VaeRuntime"):
        from . import runtime

        return getattr(runtime, name)
    if name == "attach":
        from .swap import attach

        return attach
    raise AttributeError(f"module 'trtvae' has no attribute {name!r}")
