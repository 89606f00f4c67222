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


# --- exact tiling's segment plans ---------------------------------------------------------------------
def default_tiles(config, factor: int) -> tuple:
    """(image tile, latent tile) in pixels, derived from `sample_size` as diffusers' AutoencoderKL does."""
    sample_size = config.get("sample_size", defaults.TILE_SAMPLE_SIZE)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return int(sample_size), int(sample_size / factor)


def exact_sizes(config, spec: ComponentSpec, factor: int, max_image_side: int = defaults.EXACT_MAX_IMAGE_SIDE):
    """(default core, largest side, side multiple) of a component's exact tiling, in its input's pixels."""
    image_tile, latent_tile = default_tiles(config, factor)
    if spec.downscale == 1:  # the decoder: its input is latents
        return latent_tile, max_image_side // factor, 1
    return image_tile, max_image_side, spec.input_multiple


def segment_window(core: int, halo: int, align: int) -> int:
    """Side of every window a tiled step runs on an axis longer than one window, for `core` px at its resolution.

    Cores are rounded down to the step's alignment and edge windows shifted inward (runtime.segments.windows),
    so one side serves every window; shorter axes run whole, in a window as long as the axis.
    """
    return max(align, core - core % align) + 2 * halo


def segment_batch(image_profiles: list) -> tuple:
    """(min, opt, max) batch of every segment plan: 1 up to the export's largest batch, tuned at its first opt."""
    return 1, image_profiles[0].batch[1], max(p.batch[2] for p in image_profiles)


def segment_profile(step: dict, ratio: tuple, batch: tuple, core: int, max_side: int, multiple: int = 1) -> dict:
    """{input name: {"min", "opt", "max"}} of one segment plan, from its manifest entry.

    `ratio` (numerator, denominator): the step's input size over the component's input size; `core`,
    `max_side` and `multiple` in the component's input pixels (exact_sizes). A tiled step's windows have
    one side at the default core (opt = max); smaller images give shorter windows, down to the smallest
    input the component takes. Whole and attention steps see the whole tensor at their resolution, up to
    `max_side`; an attention step's x and residual hold query rows of the full width, kv all rows.
    """
    num, den = ratio
    low = max(1, multiple * num // den)
    if step["kind"] == "tiled":
        side = max(low, segment_window(core * num // den, int(step["halo"]), int(step.get("align", 1))))
        space = (low, side, side)
    else:
        top = max(low, max_side * num // den)
        space = (low, min(max(low, core * num // den), top), top)
    rows = (1, space[1], space[1]) if step["kind"] == "attention" else space
    profile = {}
    for io in step["inputs"]:
        name, channels = io["name"], int(io["shape"][1])
        if len(io["shape"]) == 2:  # mean, rstd: per sample and channel
            dims = [(b, channels) for b in batch]
        else:
            height = space if name == "kv" else rows
            dims = [(b, channels, h, w) for b, h, w in zip(batch, height, space)]
        profile[name] = {k: list(d) for k, d in zip(("min", "opt", "max"), dims)}
    return profile


def largest_core(core: int, tiled: list) -> int:
    """The largest core side (component input pixels, at most `core`) whose windows fit every tiled plan.

    tiled: (ratio, halo, align, largest window side) of each tiled step.
    """
    def fits(c):
        return all(segment_window(c * num // den, halo, align) <= top for (num, den), halo, align, top in tiled)

    while core > 1 and not fits(core):
        core -= 1
    return core
