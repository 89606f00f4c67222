"""diffusers' remote VAE protocol ("Hybrid Inference"), as `diffusers.utils.remote_utils` speaks it:
requests parsed into tensors for the served models, their outputs packed into the answers the client reads.

No HTTP and no model here (`hybrid.py` has the app); every refusal is a `HybridError` whose message names
what was wrong and what was expected. What the client sends (diffusers 0.42 `prepare_decode`/`prepare_encode`):
query parameters through `requests`, so a list is repeated (`shape=1&shape=4&...`), a bool is `True`/`False`
and a float is `str(float)`; the body is the tensor's raw bytes (decode), or a PNG or raw bytes (encode).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from .. import defaults
from ..components import DECODER, ENCODER, component_specs, spatial_factor
from ..latents import unscale

TENSOR_MEDIA = "tensor/binary"
IMAGE_MEDIA = {"png": "image/png", "jpg": "image/jpeg"}
# What the client's `str(tensor.dtype).split(".")[-1]` gives for the dtypes its DTYPE_MAP reads back.
REQUEST_DTYPES = ("float16", "float32", "bfloat16")
ENCODE_DTYPES = (*REQUEST_DTYPES, "uint8")  # uint8 image tensors: 0..255
OUTPUT_TYPES = ("pt", "pil")  # "mp4" is for video VAEs


class HybridError(Exception):
    """A refused request: `status` is its HTTP status, the message says what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class VaeFacts:
    """What the protocol needs to know of the served VAE, from its manifest."""

    config: dict  # vae_config: scaling_factor, shift_factor (latents_mean/std) for `do_scaling`
    latent_channels: int
    image_channels: int
    factor: int  # spatial factor: image side = factor × latent side
    io_dtype: str  # the served decoder's and encoder's tensor dtype
    components: tuple

    @classmethod
    def from_manifest(cls, manifest: dict) -> "VaeFacts":
        config = manifest["vae_config"]
        specs = component_specs(config)
        return cls(config, specs[DECODER].in_channels, specs[ENCODER].in_channels, spatial_factor(config),
                   manifest["io_dtype"], tuple(manifest["components"]))


def _values(query, name: str) -> list:
    return list(query.getlist(name)) if hasattr(query, "getlist") else ([query[name]] if name in query else [])


def _one(query, name: str):
    values = _values(query, name)
    return values[-1] if values else None


def parse_float(query, name: str) -> float | None:
    text = _one(query, name)
    if text is None or text in ("", "None"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise HybridError(400, f"{name}={text!r}: expected a number") from None
    if not np.isfinite(value) or (name == "scaling_factor" and value == 0):
        raise HybridError(400, f"{name}={text!r}: expected a finite{' non-zero' * (name == 'scaling_factor')} number")
    return value


def parse_bool(query, name: str, default: bool = False) -> bool:
    text = _one(query, name)
    if text is None or text == "":
        return default
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no", "none"):
        return False
    raise HybridError(400, f"{name}={text!r}: expected True or False")


def parse_shape(query) -> list | None:
    values = _values(query, "shape")
    if not values:
        return None
    try:
        shape = json.loads(values[0]) if len(values) == 1 and values[0].lstrip().startswith("[") else \
            [int(v) for v in values]
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError
    except (ValueError, TypeError):
        raise HybridError(400, f"shape={values}: expected a list of positive integers, e.g. [1, 4, 128, 128]") from None
    return shape


def tensor_from_body(body: bytearray, shape: list | None, dtype: str | None, allowed: tuple, what: str):
    """The body as a torch tensor of `shape` and `dtype`, after checking both against its byte count."""
    import torch

    if shape is None:
        raise HybridError(400, f"{what}: the shape query parameter is missing (the tensor's dims, e.g. [1, 4, 128, 128])")
    if dtype not in allowed:
        raise HybridError(400, f"{what}: unknown dtype {dtype!r}: expected one of {', '.join(allowed)}")
    torch_dtype = getattr(torch, dtype)
    need = int(np.prod(shape)) * torch.empty((), dtype=torch_dtype).element_size()
    if len(body) != need:
        raise HybridError(400, f"{what}: shape {shape} of {dtype} is {need} bytes, the body has {len(body)} "
                               "(shape and byte count disagree: a truncated body or a wrong shape/dtype)")
    return torch.frombuffer(body, dtype=torch_dtype).reshape(shape)


def check_finite(x, what: str) -> None:
    import torch

    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise HybridError(400, f"{what}: {bad} of {x.numel()} values are NaN or inf; refusing to use them")


def unpack_latents(z, height: int, width: int, factor: int, channels: int):
    """FLUX's packed [B, (h/2)·(w/2), 4·C] → [B, C, h, w], as `FluxPipeline._unpack_latents` does (its module
    imports transformers; the test checks this against it)."""
    b, tokens, packed = z.shape
    h, w = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    if packed != 4 * channels or tokens != (h // 2) * (w // 2) or h == 0 or w == 0:
        raise HybridError(400, f"packed latents {list(z.shape)} do not fit height={height}, width={width}: expected "
                               f"[B, {(h // 2) * (w // 2)}, {4 * channels}] ((h/2)·(w/2) tokens of 4·{channels} "
                               f"channels, h = 2·(height // {2 * factor}))")
    return z.reshape(b, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, h, w)


@dataclass
class DecodeRequest:
    latents: np.ndarray  # [B, C, h, w] unscaled, in the decoder's dtype
    answer: str  # "float" ([-1, 1], I/O dtype), "unit" ([0, 1] float32), "uint8" [B, H, W, 3], "png" or "jpg"


def _answer(query, accept: str | None) -> str:
    output_type = _one(query, "output_type") or "pil"
    if output_type == "mp4":
        raise HybridError(400, "output_type='mp4' is for video VAEs; this server serves an image VAE "
                               "(AutoencoderKL): ask for 'pil' or 'pt'")
    if output_type not in OUTPUT_TYPES:
        raise HybridError(400, f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
    image_format = _one(query, "image_format") or "jpg"
    if image_format not in IMAGE_MEDIA:
        raise HybridError(400, f"image_format={image_format!r}: expected one of {', '.join(IMAGE_MEDIA)}")
    partial = parse_bool(query, "partial_postprocess")
    for media in (m.split(";")[0].strip().lower() for m in (accept or "*/*").split(",")):
        if media == TENSOR_MEDIA:
            return "unit" if output_type == "pil" else "uint8" if partial else "float"
        for fmt, image_media in IMAGE_MEDIA.items():
            if media == image_media:
                return fmt
        if media in ("*/*", "image/*", ""):
            return image_format if output_type == "pil" else "uint8" if partial else "float"
    raise HybridError(400, f"Accept: {accept!r}: expected image/jpeg, image/png or {TENSOR_MEDIA}")


def parse_decode(query, accept: str | None, body: bytearray, facts: VaeFacts) -> DecodeRequest:
    import torch

    answer = _answer(query, accept)
    z = tensor_from_body(body, parse_shape(query), _one(query, "dtype"), REQUEST_DTYPES, "latents")
    check_finite(z, "latents")
    z = z.float()
    c = facts.latent_channels
    if z.ndim == 3:
        height, width = (_int(query, name) for name in ("height", "width"))
        if height is None or width is None:
            raise HybridError(400, f"packed latents {list(z.shape)} need the height and width query parameters "
                                   "(the image's, as FluxPipeline takes them)")
        z = unpack_latents(z, height, width, facts.factor, c)
    elif z.ndim != 4 or z.shape[1] != c:
        raise HybridError(400, f"latents of shape {list(z.shape)}: this VAE takes [B, {c}, h, w] "
                               f"({c} latent channels), or packed [B, (h/2)·(w/2), {4 * c}] with height and width")
    if answer in ("png", "jpg") and z.shape[0] != 1:
        raise HybridError(400, f"an image answer holds one image, the latents hold {z.shape[0]}: send one, or ask "
                               "for output_type='pt'")
    scaling, shift = parse_float(query, "scaling_factor"), parse_float(query, "shift_factor")
    if scaling is None and parse_bool(query, "do_scaling"):
        if shift is None:  # the client's deprecated default: the server's own config unscales
            z = unscale(z, facts.config)
        else:
            z = z / float(facts.config.get("scaling_factor") or 1.0) + shift
    elif scaling is not None or shift is not None:
        z = z / (scaling if scaling is not None else 1.0) + (shift or 0.0)
    return DecodeRequest(z.to(getattr(torch, facts.io_dtype)).contiguous().numpy(), answer)


def _int(query, name: str) -> int | None:
    text = _one(query, name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise HybridError(400, f"{name}={text!r}: expected a whole number of pixels") from None
    if value <= 0:
        raise HybridError(400, f"{name}={value}: expected a positive number of pixels")
    return value


def image_processor(facts: VaeFacts):
    from diffusers.image_processor import VaeImageProcessor

    # do_resize off: a size that is not a multiple of the factor is refused, never silently resized.
    return VaeImageProcessor(vae_scale_factor=facts.factor, do_resize=False)


def pack_tensor(array: np.ndarray) -> tuple:
    """(raw bytes, headers) as the client's `postprocess_*` reads them back with torch.frombuffer."""
    array = np.ascontiguousarray(array)
    return array.tobytes(), {"shape": json.dumps(list(array.shape)), "dtype": array.dtype.name}


def pack_decode(sample: np.ndarray, request: DecodeRequest, processor) -> tuple:
    """(body, media type, headers) for the decoded `sample` [B, 3, H, W] in [-1, 1] (Triton's read-only array)."""
    import torch

    if request.answer == "float":
        return _tensor_answer(sample)
    x = torch.from_numpy(sample.astype(np.float32))
    if request.answer == "unit":
        # float32: the client rounds these ×255 itself, and fp16 steps would move pixels by one level.
        return _tensor_answer(processor.postprocess(x, output_type="pt").numpy())
    pixels = np.round(processor.postprocess(x, output_type="np") * 255).astype(np.uint8)  # as numpy_to_pil
    if request.answer == "uint8":
        return _tensor_answer(pixels)
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(pixels[0])
    if request.answer == "png":
        image.save(buffer, format="PNG", compress_level=defaults.HYBRID_PNG_COMPRESS_LEVEL)
    else:
        # 4:4:4: PIL's default 4:2:0 halves the colour resolution (19 dB instead of 36 dB on a noisy image).
        image.save(buffer, format="JPEG", quality=defaults.HYBRID_JPEG_QUALITY, subsampling=0)
    return buffer.getvalue(), IMAGE_MEDIA[request.answer], {}


def _tensor_answer(array: np.ndarray) -> tuple:
    data, headers = pack_tensor(array)
    return data, TENSOR_MEDIA, headers


@dataclass
class EncodeRequest:
    image: np.ndarray  # [B, 3, H, W] in [-1, 1], in the encoder's dtype
    scaling: float | None
    shift: float | None


def parse_encode(query, body: bytearray, facts: VaeFacts, processor) -> EncodeRequest:
    """A PNG (any image PIL reads) or, with shape/dtype, a tensor [B, 3, H, W] ([3, H, W]) in [0, 1] (uint8:
    0..255), or in [-1, 1] where it has negative values, as `VaeImageProcessor.preprocess` takes tensors."""
    import torch

    scaling, shift = parse_float(query, "scaling_factor"), parse_float(query, "shift_factor")
    if not body:
        raise HybridError(400, "empty body: expected a PNG, or a tensor's bytes with shape and dtype")
    if _values(query, "shape"):
        x = tensor_from_body(body, parse_shape(query), _one(query, "dtype"), ENCODE_DTYPES, "image tensor")
        check_finite(x, "image tensor")
        if x.ndim not in (3, 4) or x.shape[-3] != facts.image_channels:
            raise HybridError(400, f"image tensor of shape {list(x.shape)}: expected [B, {facts.image_channels}, H, W]")
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        x = processor.preprocess(x if x.ndim == 4 else x[None])
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(body))
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise HybridError(400, f"the body is not an image PIL can read ({e}); send a PNG, or a tensor's bytes "
                                   "with the shape and dtype query parameters") from None
        x = processor.preprocess(image.convert("RGB"))
    h, w = x.shape[-2:]
    if h % facts.factor or w % facts.factor:
        raise HybridError(400, f"image of {w}×{h} px: width and height must be multiples of {facts.factor} "
                               f"(this VAE's spatial factor)")
    return EncodeRequest(x.to(getattr(torch, facts.io_dtype)).contiguous().numpy(), scaling, shift)


def pack_encode(parameters: np.ndarray, request: EncodeRequest) -> tuple:
    """(body, headers): the posterior mean (the first half of the encoder's mean/logvar channels), scaled as
    `(mean - shift_factor) * scaling_factor` where given; in the encoder's dtype, scaled in float32."""
    mean = parameters[:, : parameters.shape[1] // 2].astype(np.float32)
    if request.shift is not None:
        mean = mean - np.float32(request.shift)
    if request.scaling is not None:
        mean = mean * np.float32(request.scaling)
    return pack_tensor(mean.astype(parameters.dtype))
