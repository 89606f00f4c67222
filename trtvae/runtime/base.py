"""Backend-neutral VAE runtime: diffusers' AutoencoderKL encode/decode API over exported graphs.

A backend subclasses `VaeRuntime` and implements `_run(component, x)`, which receives a
validated, contiguous tensor in the model's dtype and returns the component's output on
the same device. Everything a user touches lives here, once.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from ..components import DECODER, ENCODER, ComponentSpec, component_specs, spatial_factor
from ..manifest import read_manifest
from ..precision import torch_dtype
from .compat import ModuleHabitsMixin
from .tiling_options import TilingMixin

class VaeRuntime(TilingMixin, ModuleHabitsMixin):
    """What `OrtVae` and `TRTVae` share. Construct through `from_pretrained(DIR)`."""

    backend = "base"

    def __init__(self, directory, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self._specs: dict[str, ComponentSpec] = component_specs(manifest["vae_config"])
        config = dict(manifest["vae_config"])
        # The graphs are fixed-precision and overflow-checked at export; a pipeline must not
        # try to upcast this object to fp32 (it would call .to() and read module parameters).
        config["force_upcast"] = False
        self.config = FrozenDict(config)
        self.dtype: torch.dtype = torch_dtype(manifest["io_dtype"])
        self.spatial_factor = spatial_factor(config)
        self._init_tiling()

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        """Load the export in `directory` (the folder holding manifest.json)."""
        return cls(directory, read_manifest(directory), **kwargs)

    # --- diffusers-compatible surface -------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, *args, **kwargs):
        """Accepted for pipeline compatibility; precision and placement are fixed at export/load."""
        dtypes = [a for a in (*args, kwargs.get("dtype")) if isinstance(a, torch.dtype)]
        if dtypes and dtypes[0] != self.dtype and not getattr(self, "_warned_to", False):
            self._warned_to = True
            warnings.warn(f"{type(self).__name__}.to({dtypes[0]}) is ignored: this export runs in {self.dtype} "
                          f"(re-export with --precision to change it); inputs of any float dtype are cast",
                          stacklevel=2)
        return self

    def decode(self, z, return_dict: bool = True, generator=None):
        """Latents [B, C_latent, h, w] → images [B, 3, f·h, f·w] in [-1, 1] (unscaled latents, as diffusers)."""
        sample = self._forward(DECODER, z)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def encode(self, x, return_dict: bool = True):
        """Images [B, 3, H, W] in [-1, 1] → `AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)`."""
        posterior = DiagonalGaussianDistribution(self._forward(ENCODER, x))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    # --- shared machinery -------------------------------------------------------------
    def _forward(self, component: str, x) -> torch.Tensor:
        spec = self._specs[component]
        x = self._validate(spec, x)
        # Slicing, tiling (asked for, or forced by `_spatial_limits`), min-size padding and
        # batch chunking (`_batch_ranges`) are chosen in tiling_options.py.
        return self._sliced_forward(component, x)

    def _batch_ranges(self, component: str, shape: tuple) -> list:
        """[(min, max)] batch sizes the backend runs at once at this H×W; any batch by default."""
        return [(1, shape[0])]

    def _spatial_limits(self, component: str):
        """((min_h, min_w), (max_h, max_w)) of the input the backend accepts, in input pixels; None for any."""
        return None

    def _run(self, component: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _expected(self, spec: ComponentSpec) -> str:
        dims = "h, w" if spec.downscale == 1 else "H, W"
        text = f"[batch, {spec.in_channels}, {dims}]"
        if spec.input_multiple > 1:
            text += f" with H and W multiples of {spec.input_multiple}"
        return text

    def _validate(self, spec: ComponentSpec, x) -> torch.Tensor:
        name = spec.input_name
        expected = self._expected(spec)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{spec.name} input {name!r}: expected a torch.Tensor {expected}, got {type(x).__name__}")
        shape = tuple(x.shape)
        if x.ndim != 4:
            raise ValueError(f"{spec.name} input {name!r}: got shape {shape} ({x.ndim} dims), expected {expected}")
        if shape[1] != spec.in_channels:
            raise ValueError(
                f"{spec.name} input {name!r}: got shape {shape} with {shape[1]} channels, expected {expected}"
            )
        if shape[0] == 0:
            raise ValueError(f"{spec.name} input {name!r}: got an empty batch {shape}, expected {expected}")
        h, w = shape[2:]
        if h == 0 or w == 0 or h % spec.input_multiple or w % spec.input_multiple:
            raise ValueError(f"{spec.name} input {name!r}: got shape {shape}, expected {expected}")
        if not x.is_floating_point():
            raise ValueError(f"{spec.name} input {name!r}: got dtype {x.dtype}, expected a floating-point tensor")
        x = x.detach().to(self.dtype).contiguous()
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(
                f"{spec.name} input {name!r}: {bad} of {x.numel()} values are NaN or inf "
                f"(after casting to {self.dtype}); refusing to propagate them into the output"
            )
        return x

    def __repr__(self) -> str:
        parts = ", ".join(sorted(self.manifest["components"]))
        return f"{type(self).__name__}({str(self.directory)!r}, precision={self.manifest['precision']}, components=[{parts}])"
