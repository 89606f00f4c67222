"""The two exported graphs, declared once: names, channels and symbolic dims.

Export, manifest, runtime and engine profiles all read these declarations, so an
input name or a dynamic axis is never spelled in two places (optimum-onnx's habit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .errors import OptionError

DECODER = "decoder"
ENCODER = "encoder"
COMPONENTS = (DECODER, ENCODER)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    input_name: str
    output_name: str
    in_channels: int
    out_channels: int
    # Spatial size of the output relative to the input: decoder ×factor, encoder ÷factor.
    upscale: int
    downscale: int
    # Symbolic dims of input and output, as written into the ONNX graph and manifest.
    input_dims: tuple
    output_dims: tuple
    # The AutoencoderKL submodules the graph runs, in order (absent ones, like SD3's quant convs, are skipped).
    modules: tuple = ()

    def output_shape(self, input_shape: tuple) -> tuple:
        b, _, h, w = input_shape
        return (b, self.out_channels, h * self.upscale // self.downscale, w * self.upscale // self.downscale)

    def owns(self, module_name: str) -> bool:
        """Whether the AutoencoderKL submodule `module_name` (a dotted path) is part of this graph."""
        return any(module_name == r or module_name.startswith(r + ".") for r in self.modules)

    @property
    def input_multiple(self) -> int:
        """H and W of the input must be multiples of this."""
        return self.downscale


def spatial_factor(config: Mapping) -> int:
    """Each down block but the last halves H and W: 8 for SDXL's four blocks."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def component_specs(config: Mapping) -> dict:
    f = spatial_factor(config)
    latent = int(config["latent_channels"])
    image_in = int(config.get("in_channels", 3))
    image_out = int(config.get("out_channels", 3))
    lat_dims = ("batch", "latent_height", "latent_width")
    img_dims = ("batch", f"{f}*latent_height", f"{f}*latent_width")
    return {
        DECODER: ComponentSpec(
            name=DECODER,
            input_name="latent_sample",
            output_name="sample",
            in_channels=latent,
            out_channels=image_out,
            upscale=f,
            downscale=1,
            input_dims=(lat_dims[0], latent, *lat_dims[1:]),
            output_dims=(img_dims[0], image_out, *img_dims[1:]),
            modules=("post_quant_conv", "decoder"),
        ),
        ENCODER: ComponentSpec(
            name=ENCODER,
            input_name="sample",
            output_name="latent_parameters",
            in_channels=image_in,
            out_channels=2 * latent,
            upscale=1,
            downscale=f,
            input_dims=(img_dims[0], image_in, *img_dims[1:]),
            output_dims=(lat_dims[0], 2 * latent, *lat_dims[1:]),
            modules=("encoder", "quant_conv"),
        ),
    }


def parse_components(value) -> tuple:
    """`--components`: "decoder,encoder" (or a sequence of names) → a tuple of names from COMPONENTS.

    Raises OptionError when it is empty or names anything else.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(c, str) for c in names):
        raise OptionError(f"--components {value!r}: expected names from {','.join(COMPONENTS)}")
    components = tuple(dict.fromkeys(c.strip() for c in names if c.strip()))  # once each, in order
    if not components or any(c not in COMPONENTS for c in components):
        shown = value if isinstance(value, str) else ",".join(value)
        raise OptionError(f"--components {shown!r}: expected a subset of {','.join(COMPONENTS)}")
    return components
