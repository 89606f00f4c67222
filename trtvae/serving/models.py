"""The served models, declared once: names, tensors, and what each one runs on a VAE runtime.

- `<prefix>_decoder`: `latent_sample` → `sample`, the same tensors as decoder.onnx (export I/O dtype).
- `<prefix>_encoder`: `sample` → `latent_parameters` (mean and logvar), as encoder.onnx.
- `<prefix>_decode_image`: `latents` FP32 as a pipeline hands them (scaled) → `image` UINT8 [B, H, W, 3]:
  the latents are unscaled as diffusers' pipelines do, decoded, and post-processed by diffusers'
  VaeImageProcessor, so a client sends latents and gets pixels.

Both the Python backend and any other host call `ServedModel.run` with one request's numpy array.

Tiling: a request larger than the tile (`--tile`, image pixels a side) is tiled exactly, from the export's
segment graphs, so it gives the same result as one untiled run at bounded memory. Where exact tiling is not
available (an export without segment graphs; for TRTVae, without their TensorRT plans) requests run
untiled: diffusers' blend tiling changes the image, so serving never chooses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import defaults
from ..components import DECODER, ENCODER, component_specs, spatial_factor
from ..errors import OptionError
from ..latents import unscale

DECODE_IMAGE = "decode_image"
KINDS = (DECODER, ENCODER, DECODE_IMAGE)


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str  # numpy/manifest name: float16, float32, uint8
    dims: tuple  # without the batch dim; -1 for a size the model accepts in a range


@dataclass(frozen=True)
class ModelDecl:
    kind: str
    name: str
    input: TensorDecl
    output: TensorDecl
    component: str  # the export component it needs


def model_decls(manifest: dict, prefix: str) -> list:
    """The models an export can serve: decoder and decode_image need the decoder, encoder the encoder."""
    specs = component_specs(manifest["vae_config"])
    io = manifest["io_dtype"]
    decls = []
    if DECODER in manifest["components"]:
        d = specs[DECODER]
        decls.append(ModelDecl(DECODER, f"{prefix}_{DECODER}", TensorDecl(d.input_name, io, (d.in_channels, -1, -1)),
                               TensorDecl(d.output_name, io, (d.out_channels, -1, -1)), DECODER))
    if ENCODER in manifest["components"]:
        e = specs[ENCODER]
        decls.append(ModelDecl(ENCODER, f"{prefix}_{ENCODER}", TensorDecl(e.input_name, io, (e.in_channels, -1, -1)),
                               TensorDecl(e.output_name, io, (e.out_channels, -1, -1)), ENCODER))
    if DECODER in manifest["components"]:
        d = specs[DECODER]
        decls.append(ModelDecl(DECODE_IMAGE, f"{prefix}_{DECODE_IMAGE}",
                               TensorDecl("latents", "float32", (d.in_channels, -1, -1)),
                               TensorDecl("image", "uint8", (-1, -1, d.out_channels)), DECODER))
    return decls


def check_tile(tile, config: dict, name: str = "--tile") -> None:
    """`tile` is None (the model's own sample_size), 0 (off) or image pixels, a multiple of the spatial factor.

    A multiple of the factor, so the latent tile is whole pixels and decode and encode tile at one size.
    """
    if tile is None:
        return
    factor = spatial_factor(config)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0 or tile % factor:
        raise OptionError(f"{name} {tile!r}: expected 0 (no tiling) or the tile side in image pixels, a positive "
                          f"multiple of {factor} (this export's spatial factor), e.g. {factor * 64}")


def parse_tile(text: str, name: str = "parameter tile"):
    """A config.pbtxt's `tile` parameter: "auto" (or absent) → None, else whole pixels (checked by check_tile)."""
    if text in ("", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"{name} {text!r}: expected 'auto', 0 (no tiling) or the tile side in image pixels") \
            from None


def serve_tiling(runtime, tile=defaults.SERVE_TILE) -> str:
    """Tile `runtime` exactly above `tile` image pixels where it can; return one line saying what it does.

    Never blend tiling: without segment graphs (or on a backend that cannot run them) requests run untiled.
    """
    check_tile(tile, runtime.config)
    if tile == 0:
        return "off (tile 0): requests of every size run untiled"
    if runtime.tiling_mode != "exact":
        line = (f"none, not exact here: {runtime.exact_tiling_unavailable}; requests of every size run untiled "
                "(blend tiling would change the image)")
        if getattr(runtime, "profiles", None):
            line += f"; inputs beyond the engine profile are blend-tiled by {type(runtime).__name__}, with a notice"
        return line
    if tile is not None:
        runtime.tile_sample_min_size = tile
        runtime.tile_latent_min_size = tile // runtime.spatial_factor
    runtime.enable_tiling(mode="exact")
    return (f"exact above {runtime.tile_sample_min_size} px a side (segment graphs: the same result as an "
            "untiled run); smaller requests run untiled")


class ServedModel:
    """One served model over a runtime: numpy batch in, numpy batch out, the runtime's checks on the way.

    `tile`: as `serve_tiling`; `self.tiling` is its line.
    """

    def __init__(self, decl: ModelDecl, runtime, tile=defaults.SERVE_TILE):
        self.decl = decl
        self.runtime = runtime
        self.tiling = serve_tiling(runtime, tile)
        self._processor = None
        if decl.kind == DECODE_IMAGE:
            from diffusers.image_processor import VaeImageProcessor

            self._processor = VaeImageProcessor(vae_scale_factor=spatial_factor(runtime.config))

    def warm_up(self) -> tuple:
        """Run one inference of the smallest input the runtime takes without padding; return its shape.

        This is what loads the runtime's sessions or engines (and checks their files against the
        manifest), so a model that returns from here is loaded; an output with NaN/inf is refused.
        With exact tiling on, one more small inference runs in tiles and loads the segment graphs.
        """
        spec = component_specs(self.runtime.config)[self.decl.component]
        profiles = getattr(self.runtime, "profiles", {}).get(self.decl.component)
        h, w = profiles[0]["min"][2:] if profiles else (spec.input_multiple, spec.input_multiple)
        shape = (1, self.decl.input.dims[0], h, w)
        self._warm_up_run(shape)
        if self.runtime.use_tiling:
            self._warm_up_tiles(spec)
        return shape

    def _warm_up_run(self, shape: tuple) -> None:
        out = self.run(np.zeros(shape, np.dtype(self.decl.input.dtype)))
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise RuntimeError(f"{self.decl.name}: the warm-up inference on zeros {shape} gave "
                               f"{int((~np.isfinite(out)).sum())} NaN/inf values of {out.size}")

    def _warm_up_tiles(self, spec) -> None:
        """One exactly tiled inference (2×2 tiles of the smallest size), so every segment graph is loaded, and
        its file checked against the manifest, before the model is ready, not at the first large request."""
        rt, m = self.runtime, spec.input_multiple
        saved = rt.tile_sample_min_size, rt.tile_latent_min_size
        factor = rt.spatial_factor
        rt.tile_sample_min_size, rt.tile_latent_min_size = (m * factor, m) if spec.name == DECODER \
            else (m, max(1, m // factor))
        try:
            self._warm_up_run((1, self.decl.input.dims[0], 2 * m, 2 * m))
        finally:
            rt.tile_sample_min_size, rt.tile_latent_min_size = saved

    def run(self, array: np.ndarray) -> np.ndarray:
        """Raises ValueError naming the tensor and the shapes for input the runtime refuses."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(array))
        with torch.inference_mode():
            if self.decl.kind == DECODER:
                y = self.runtime.decode(x).sample
            elif self.decl.kind == ENCODER:
                y = self.runtime.encode(x).latent_dist.parameters
            else:
                if not torch.isfinite(x).all():  # the runtime would say it after unscaling; say it of `latents`
                    raise ValueError(f"{self.decl.name} input 'latents': {int((~torch.isfinite(x)).sum())} of "
                                     f"{x.numel()} values are NaN or inf; refusing to decode them")
                image = self.runtime.decode(unscale(x.float(), self.runtime.config)).sample
                pixels = self._processor.postprocess(image.float().cpu(), output_type="np")
                return np.round(pixels * 255).astype(np.uint8)
        return y.cpu().numpy()
