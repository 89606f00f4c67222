"""The AutoencoderKL families people deploy, and which one a model belongs to.

SD1.x/2.x, SDXL, SD3/3.5 and FLUX.1 (and the models that reuse their VAEs) share diffusers'
`AutoencoderKL`; they differ in latent channels, quant convs and the latent scale
(`scaling_factor`, `shift_factor`). A family is its published vae/config.json, shipped in
export/configs/. A model with its own config belongs to the family whose latent space it has
(`family_of_config`); weights fix the architecture but never the latent scale: SD1 and SDXL VAEs
have identical tensors, and so have SD3 and FLUX.1, so only the user can say which of a pair a
file is (`family_of_file`).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from ..errors import ModelLoadError, OptionError


@dataclass(frozen=True)
class Family:
    name: str
    config_file: str  # the published vae/config.json, in export/configs/
    # As shipped, per the ecosystem (README's family table), not a measurement of ours: SD1.x and SD3
    # pipelines decode in fp16; SDXL's fp16-fix does (stabilityai/sdxl-vae overflows); FLUX.1's gives NaN.
    fp16_safe_as_shipped: bool


FAMILIES = {f.name: f for f in (
    Family("sd15", "sd15_vae.json", True),  # stable-diffusion-v1-5/stable-diffusion-v1-5
    Family("sdxl", "sdxl_vae.json", True),  # madebyollin/sdxl-vae-fp16-fix
    Family("sd3", "sd3_vae.json", True),  # stabilityai/stable-diffusion-3-medium-diffusers
    Family("flux", "flux_vae.json", False),  # black-forest-labs/FLUX.1-dev
)}
NAMES = tuple(FAMILIES)
DEFAULT = "sdxl"  # the mission's model: a 4-channel file without --family is taken as SDXL
# What a family fixes about the latent space: the keys a pipeline reads to scale latents.
LATENT_KEYS = ("latent_channels", "scaling_factor", "shift_factor")
# Keys read from tensors; everything else in a family's config (norm_num_groups included) no tensor records.
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                     "down_block_types", "up_block_types", "use_quant_conv", "use_post_quant_conv",
                     "mid_block_add_attention")


def check_name(family: str | None) -> str | None:
    if family is not None and family not in FAMILIES:
        raise OptionError(f"--family {family!r}: expected one of {', '.join(NAMES)}")
    return family


def config_path(name: str) -> str:
    """The family's published config file, for diffusers' `config=` arguments (the package is installed as files)."""
    return str(resources.files("trtvae.export").joinpath(f"configs/{FAMILIES[check_name(name)].config_file}"))


@cache
def _config_text(name: str) -> str:
    return Path(config_path(name)).read_text()


def family_config(name: str) -> dict:
    """The published vae/config.json of a family (a fresh dict each call)."""
    check_name(name)
    return json.loads(_config_text(name))


@cache
def _class_defaults() -> dict:
    from diffusers import AutoencoderKL

    params = inspect.signature(AutoencoderKL.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def effective(config: dict, key: str):
    """A config value as diffusers would use it: a missing key means the class default."""
    return config[key] if key in config else _class_defaults().get(key)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(abs(a), abs(b), 1)
    return a == b


def identify(config: dict) -> str | None:
    """The family whose latent space `config` has, or None (a custom VAE)."""
    for name in NAMES:
        published = family_config(name)
        if all(_same(effective(config, k), effective(published, k)) for k in LATENT_KEYS):
            return name
    return None


def family_of_config(config: dict, family: str | None, where: str) -> str | None:
    """The family of a model with its own config: the one asked for, which must agree, else the one it has."""
    check_name(family)
    if family is None:
        return identify(config)
    published = family_config(family)
    for key in LATENT_KEYS:
        mine, theirs = effective(config, key), effective(published, key)
        if not _same(mine, theirs):
            name = identify(config)
            raise ModelLoadError(f"{where} has {key}={mine!r}, but --family {family} has {key}={theirs!r}; "
                                 f"the model's own config wins, so drop --family or pick the family it belongs to"
                                 + (f" (its config is that of --family {name})" if name else ""))
    return family


def family_of_file(architecture: dict, family: str | None, where: str) -> tuple[str, dict, list, bool]:
    """A weights file's family; its config (the family's, with the architecture read from the tensors);
    notes to show; and whether the family was assumed (chosen among several without the user's word).

    Weights fix the latent channels only: a family is chosen among those with as many, the default
    one where it is among them (with a note saying so), else the user must say.
    """
    check_name(family)
    channels = architecture["latent_channels"]
    fitting = [n for n in NAMES if family_config(n)["latent_channels"] == channels]
    notes, assumed = [], False
    if family is not None:
        wanted = family_config(family)["latent_channels"]
        if wanted != channels:
            raise ModelLoadError(f"{where} has {channels} latent channels (decoder.conv_in.weight), but --family "
                                 f"{family} has {wanted}" + (f"; it can be {' or '.join(fitting)}" if fitting else ""))
    elif not fitting:
        by_channels = ", ".join(f"{family_config(n)['latent_channels']} ({n})" for n in NAMES)
        raise ModelLoadError(f"{where}: tensor decoder.conv_in.weight has {channels} latent channels, which fits no "
                             f"AutoencoderKL family (latent channels: {by_channels})")
    elif len(fitting) > 1 and DEFAULT not in fitting:
        raise ModelLoadError(f"{where} has {channels} latent channels, which {' and '.join(fitting)} VAEs share with "
                             f"identical tensors but different latent scales: pass --family "
                             f"{' or '.join(fitting)} ({'; '.join(_scale(n) for n in fitting)})")
    else:
        family = DEFAULT if DEFAULT in fitting else fitting[0]
        assumed = len(fitting) > 1
        if assumed:
            notes.append(f"{where} has {channels} latent channels: SD1.x/2.x and SDXL VAEs have the same tensors; "
                         f"taking --family {family} (pass --family {' or '.join(fitting)} to choose)")
    published = family_config(family)
    # Block types follow from the widths, so they are not news of their own.
    differs = [k for k in ARCHITECTURE_KEYS if not k.endswith("block_types")
               and effective(published, k) != architecture[k]]
    if differs:
        # Everything else comes from the family's config; norm_num_groups above all, which no tensor records.
        notes.append(f"{where}: {', '.join(differs)} differ from the published {family} VAE's; "
                     f"norm_num_groups={published['norm_num_groups']} and the rest are taken from its config")
    return family, {**published, **architecture}, notes, assumed


def _scale(name: str) -> str:
    c = family_config(name)
    shift = f", shift_factor {c['shift_factor']}" if c.get("shift_factor") is not None else ""
    return f"{name}: scaling_factor {c['scaling_factor']}{shift}"
