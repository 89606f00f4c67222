"""Engine shape profiles in user terms (batch range, image-pixel resolution range), and choosing one at run time.

Pure Python: the exporter uses it to build, the runtime to pick a profile, split batches and
decide on tiling, and tests run it without TensorRT.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import defaults
from .components import ComponentSpec
from .errors import OptionError


@dataclass(frozen=True)
class ImageProfile:
    """A profile in image pixels: batch min/opt/max and height/width min/opt/max."""

    batch: tuple  # (min, opt, max)
    height: tuple
    width: tuple

    def as_dict(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}


def _int(text: str, what: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise OptionError(f"{what}: {text!r} is not a positive whole number")
    return int(text)


def parse_range(text: str, what: str) -> tuple:
    """'1-4' → (1, 4); '4' → (4, 4)."""
    parts = str(text).split("-")
    if len(parts) not in (1, 2):
        raise OptionError(f"{what}: {text!r} is not MIN-MAX or a single number")
    lo, hi = (_int(parts[0], what), _int(parts[-1], what))
    if lo < 1:
        raise OptionError(f"{what}: {text!r} must be at least 1")
    if lo > hi:
        raise OptionError(f"{what}: {text!r} has min {lo} > max {hi}")
    return lo, hi


def parse_static(text: str) -> tuple:
    """'1024x768' (width × height) → (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not m:
        raise OptionError(f"--static: {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    return int(m.group(2)), int(m.group(1))


def make_profile(factor: int, batch=defaults.BATCH, resolution=defaults.RESOLUTION, opt=None, static=None,
                 opt_batch=None) -> ImageProfile:
    """Validate user terms and build an ImageProfile. Everything wrong is reported before any work."""
    b_lo, b_hi = parse_range(batch, "--batch")
    b_opt = _int(str(opt_batch), "batch opt") if opt_batch is not None else b_lo
    if not b_lo <= b_opt <= b_hi:
        raise OptionError(f"batch opt {b_opt} is outside --batch {b_lo}-{b_hi}")
    if static is not None:
        h, w = parse_static(static)
        height, width = (h, h, h), (w, w, w)
    else:
        lo, hi = parse_range(resolution, "--resolution")
        o = _int(str(opt), "--opt") if opt is not None else min(max(defaults.OPT, lo), hi)
        if not lo <= o <= hi:
            raise OptionError(f"--opt {o} is outside --resolution {lo}-{hi}")
        height = width = (lo, o, hi)
    for name, dims in (("height", height), ("width", width)):
        bad = [d for d in dims if d % factor]
        if bad:
            raise OptionError(
                f"{name} {bad[0]} px is not a multiple of the VAE's spatial factor {factor} "
                f"(the latent is 1/{factor} of the image)"
            )
    return ImageProfile((b_lo, b_opt, b_hi), height, width)


def parse_profile_option(text: str, factor: int) -> ImageProfile:
    """One `--profile` value: comma-separated key=value among batch, resolution, opt, static, opt_batch.

    e.g. `--profile batch=1-4,resolution=512-1024,opt=768` or `--profile batch=1,static=1024x1024`.
    """
    keys = {"batch", "resolution", "opt", "static", "opt_batch"}
    kwargs = {}
    for item in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in keys:
            raise OptionError(f"--profile {text!r}: {item!r} is not one of {', '.join(sorted(keys))} as key=value")
        kwargs[key] = value.strip()
    if "static" in kwargs and ("resolution" in kwargs or "opt" in kwargs):
        raise OptionError(f"--profile {text!r}: static and resolution/opt exclude each other")
    return make_profile(factor, **kwargs)


def component_shapes(profile: ImageProfile, spec: ComponentSpec, factor: int) -> dict:
    """min/opt/max input shapes of one component: the decoder's in latents, the encoder's in pixels."""
    div = factor if spec.downscale == 1 else 1
    shapes = {}
    for i, key in enumerate(("min", "opt", "max")):
        shapes[key] = [profile.batch[i], spec.in_channels, profile.height[i] // div, profile.width[i] // div]
    return shapes


def contains(shapes: dict, shape) -> bool:
    return all(lo <= s <= hi for lo, s, hi in zip(shapes["min"], shape, shapes["max"]))


def select_profile(profiles: list, shape) -> int | None:
    """Index of the profile containing `shape`; among several, the tightest (it was tuned closest)."""
    fitting = [i for i, p in enumerate(profiles) if contains(p, shape)]
    if not fitting:
        return None

    def volume(i):
        lo, hi = profiles[i]["min"], profiles[i]["max"]
        v = 1
        for a, b in zip(lo, hi):
            v *= b - a + 1
        return v

    return min(fitting, key=volume)


def _holding_hw(profiles: list, shape) -> list:
    return [p for p in profiles if all(lo <= s <= hi for lo, s, hi in zip(p["min"][2:], shape[2:], p["max"][2:]))]


def batch_ranges(profiles: list, shape) -> list:
    """(min, max) batch of every profile holding this H×W."""
    return [(p["min"][0], p["max"][0]) for p in _holding_hw(profiles, shape)]


def spatial_limits(profiles: list):
    """((min_h, min_w), (max_h, max_w)) of the profile with the widest H×W range, in input units.

    Tiling needs one range in which every size runs. The union of several profiles can have
    holes (512-1024 plus a static 1536 leaves 1200 uncovered), so the widest single profile
    is used; inputs outside it are tiled into it even where a narrower profile would fit.
    """
    def area(p):
        return (p["max"][2] - p["min"][2] + 1) * (p["max"][3] - p["min"][3] + 1)

    widest = max(profiles, key=area)
    return (tuple(widest["min"][2:]), tuple(widest["max"][2:]))


def describe_ranges(profiles: list) -> str:
    return "; ".join(f"#{i}: min {p['min']} max {p['max']}" for i, p in enumerate(profiles))


def verify_shapes(shapes: dict, multiple: int = 1) -> list:
    """Shapes to verify an engine profile at: min, opt, max, and off-grid sizes between them.

    Dynamic engines have given wrong results away from the opt shape, so the off-grid sizes
    are non-square and not on min/opt/max.
    """
    lo, opt, hi = shapes["min"], shapes["opt"], shapes["max"]

    def snap(v, a, b):
        v = max(a, min(b, v - v % multiple))
        return v

    picks = [tuple(lo), tuple(opt), tuple(hi)]
    mid_lo = [lo[0], lo[1], snap((lo[2] + opt[2]) // 2 + multiple, lo[2], opt[2]),
              snap((lo[3] + opt[3]) // 2 - multiple, lo[3], opt[3])]
    mid_hi = [hi[0] if hi[0] == lo[0] else max(lo[0], (lo[0] + hi[0]) // 2 + (lo[0] + hi[0]) % 2),
              lo[1], snap((opt[2] + hi[2]) // 2 - multiple, opt[2], hi[2]),
              snap((opt[3] + hi[3]) // 2 + 3 * multiple, opt[3], hi[3])]
    for s in (mid_lo, mid_hi):
        if tuple(s) not in picks:
            picks.append(tuple(s))
    return picks
