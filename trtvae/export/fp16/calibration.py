"""Calibration inputs for the fp16 audit, made on the spot: no downloads, deterministic.

Images carry what drives a VAE's activations hardest in practice: saturated colours,
sharp edges, high-frequency strokes (text) and smooth gradients. Latents come from
those images through the fp32 encoder, since that is what a pipeline decodes for
img2img; scaled random latents stand in for text-to-image latents. The user's own
images (`--images DIR`) join the built-in ones, since real images can drive
activations harder than synthetic ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ... import defaults
from ...latents import unscale
from ...components import DECODER, ENCODER, spatial_factor
from ...errors import OptionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

def _gradient(h, w, rng):
    y, x = np.mgrid[0:h, 0:w] / np.array([max(h - 1, 1), max(w - 1, 1)])[:, None, None]
    angle = rng.uniform(0, 2 * np.pi, size=3)
    return np.stack([np.cos(a) * x + np.sin(a) * y for a in angle]) * 2 - 1


def _patches(h, w, rng, cell=16):
    # Fully saturated primaries and black/white: the corners of the colour cube.
    colours = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1],
                        [1, 1, 1], [-1, -1, -1]], dtype=np.float64)
    grid = rng.integers(0, len(colours), size=(h // cell + 1, w // cell + 1))
    img = colours[grid].repeat(cell, 0).repeat(cell, 1)[:h, :w]
    return img.transpose(2, 0, 1)


def _edges(h, w, rng):
    y, x = np.mgrid[0:h, 0:w]
    period = int(rng.integers(3, 9))
    checker = ((x // period + y // period) % 2) * 2.0 - 1
    disc = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2) * 2.0 - 1
    return np.stack([checker, disc, checker * disc])


def _strokes(h, w, rng):
    """Dark, one-to-two pixel strokes on a light ground: what text looks like to a VAE."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (245, 240, 230))
    draw = ImageDraw.Draw(img)
    for row in range(4, h - 4, 11):
        x = 3
        while x < w - 8:
            glyph_w = int(rng.integers(3, 7))
            pts = [(x + rng.integers(0, glyph_w), row + rng.integers(0, 9)) for _ in range(3)]
            draw.line([tuple(map(int, p)) for p in pts], fill=(10, 10, 20), width=int(rng.integers(1, 3)))
            x += glyph_w + 2
    return np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 127.5 - 1


PATTERNS = {"gradient": _gradient, "patches": _patches, "edges": _edges, "strokes": _strokes}


def _pattern_batch(h, w, channels, seed):
    imgs = []
    for i, make in enumerate(PATTERNS.values()):
        img = make(h, w, np.random.default_rng(seed * 1000 + i))
        imgs.append(np.resize(img, (channels, h, w)) if img.shape[0] != channels else img)
    return torch.from_numpy(np.clip(np.stack(imgs), -1, 1)).float()


def _mosaic(h, w, channels, seed):
    """All patterns in one image, one per quadrant: their borders are edges too."""
    quads = _pattern_batch(h // 2, w // 2, channels, seed + 1)
    top = torch.cat([quads[0], quads[1]], dim=2)
    bottom = torch.cat([quads[2], quads[3]], dim=2)
    img = torch.zeros(channels, h, w)
    img[:, : 2 * (h // 2), : 2 * (w // 2)] = torch.cat([top, bottom], dim=1)
    return img[None]


def calibration_images(sizes, channels: int = 3, seed: int = 0) -> list:
    """[(label, images [B, C, H, W] in [-1, 1])]: every pattern at the first size, a mosaic at the others.

    Activation maxima depend on local content more than on image size, so one mosaic
    per extra size keeps the audit's cost down without losing a pattern.
    """
    (h, w), *others = sizes
    out = [(f"patterns {h}x{w}", _pattern_batch(h, w, channels, seed))]
    out += [(f"mosaic {h}x{w}", _mosaic(h, w, channels, seed)) for h, w in others]
    return out


def random_latents(config, sizes, seed: int = 0) -> list:
    """Unit-variance latents as text-to-image hands them to decode (unscaled: / scaling_factor + shift_factor)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        z = unscale(torch.randn(1, int(config["latent_channels"]), h, w, generator=g), config)
        out.append((f"random latents {h}x{w}", z))
    return out


@torch.no_grad()
def encoded_latents(vae, images: list) -> list:
    """Latents of the calibration images by the fp32 encoder (the distribution's mean)."""
    return [(f"latents of {label}", vae.encode(x).latent_dist.mean) for label, x in images]


def list_images(folder) -> list:
    """The PNG/JPEG files of `folder`, sorted; an OptionError for a missing folder or one without images."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise OptionError(f"--images {folder}: no such folder (expected a folder of .png/.jpg images)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OptionError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} images in it")
    return files


def load_images(folder, factor: int, max_side: int = defaults.CALIBRATION_IMAGE_SIDE,
                limit: int = defaults.CALIBRATION_IMAGES) -> list:
    """[(label, RGB image [1, 3, H, W] in [-1, 1])]: each file shrunk to `max_side`, centre-cropped to the factor."""
    from PIL import Image, UnidentifiedImageError

    files = list_images(folder)
    if len(files) > limit:
        from ..progress import console

        console.print(f"[yellow]![/] --images {folder}: {len(files)} images, calibrating on the first {limit}")
        files = files[:limit]
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # keeps the aspect ratio
                w, h = (im.width // factor) * factor, (im.height // factor) * factor
                if not w or not h:
                    raise OptionError(f"--images: {path} is smaller than {factor}×{factor} pixels")
                left, top = (im.width - w) // 2, (im.height - h) // 2
                pixels = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.float32)
        except (OSError, UnidentifiedImageError) as e:
            raise OptionError(f"--images: cannot read {path}: {e}") from None
        out.append((f"image {path.name} {h}x{w}", torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1))
    return out


def calibration_inputs(vae, components, latent_sizes=defaults.CALIBRATION_LATENT_SIZES, image_dir=None) -> dict:
    """{component: [(label, input)]}; decoder latents need the encoder, whatever is audited.

    `image_dir`: the user's images, added to the built-in ones (and their latents to the decoder's).
    """
    f = spatial_factor(vae.config)
    channels = int(vae.config.get("in_channels", 3))
    images = calibration_images([(h * f, w * f) for h, w in latent_sizes], channels)
    if image_dir is not None:
        if channels != 3:
            raise OptionError(f"--images: the model takes {channels}-channel images, not RGB")
        images += load_images(image_dir, f)
    out = {}
    if ENCODER in components:
        out[ENCODER] = images
    if DECODER in components:
        out[DECODER] = encoded_latents(vae, images) + random_latents(vae.config, latent_sizes)
    return out
