"""The AutoencoderKL families people deploy, and how to tell which architecture a weights file holds.

SD1.x/2.x, SDXL, SD3/3.5 and FLUX.1 (and the models that reuse their VAEs) share diffusers'
`AutoencoderKL`; they differ in latent channels, quant convs and the latent scale
(`scaling_factor`, `shift_factor`). A family is its published vae/config.json, shipped in
export/configs/. Weights fix the architecture but never the latent scale: SD1 and SDXL VAEs
have identical tensors, and so have SD3 and FLUX.1, so only the user can say which of a pair a
file is.
"""
from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch

from ..errors import ModelLoadError, OptionError


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    config_file: str
    published: str  # the repo whose vae/config.json this is
    fp16_safe_as_shipped: bool
    fp16_note: str  # why we say so: what the ecosystem does with it, not a measurement of ours


FAMILIES = {f.name: f for f in (
    Family("sd15", "Stable Diffusion 1.x / 2.x", "sd15_vae.json", "stable-diffusion-v1-5/stable-diffusion-v1-5", True,
           "its pipelines decode in fp16 without upcasting"),
    Family("sdxl", "Stable Diffusion XL", "sdxl_vae.json", "madebyollin/sdxl-vae-fp16-fix", True,
           "the fp16-fix is; stabilityai/sdxl-vae (same architecture, force_upcast true) overflows to NaN"),
    Family("sd3", "Stable Diffusion 3 / 3.5", "sd3_vae.json", "stabilityai/stable-diffusion-3-medium-diffusers", True,
           "diffusers' SD3 pipelines decode in fp16 without upcasting"),
    Family("flux", "FLUX.1", "flux_vae.json", "black-forest-labs/FLUX.1-dev", False,
           "fp16 decodes to NaN (black images) in several tools; it is run in bf16 or fp32"),
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


@cache
def _config_text(name: str) -> str:
    return resources.files("trtvae.export").joinpath(f"configs/{FAMILIES[name].config_file}").read_text()


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


def check_against(config: dict, family: str, where: str) -> None:
    """A model's own config must agree with the family asked for: name the first key where they differ."""
    published = family_config(family)
    for key in LATENT_KEYS:
        mine, theirs = effective(config, key), effective(published, key)
        if not _same(mine, theirs):
            raise ModelLoadError(f"{where} has {key}={mine!r}, but --family {family} has {key}={theirs!r}; "
                                 f"the model's own config wins, so drop --family or pick the family it belongs to"
                                 f"{_suggest(config)}")


def _suggest(config: dict) -> str:
    name = identify(config)
    return f" (its config is that of --family {name})" if name else ""


# -- weights files --------------------------------------------------------------------------------

def strip_prefix(state: dict) -> tuple[dict, str]:
    """The VAE's tensors without a checkpoint prefix, and the prefix ("" for a VAE-only file)."""
    # diffusers' own list: `first_stage_model.` (SD/SD3 checkpoints) and `vae.` (ComfyUI saves).
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS

    for prefix in LDM_VAE_KEYS:
        if any(k.startswith(prefix + "decoder.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix
    return dict(state), ""


def key_format(state: dict) -> str:
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
        return "ldm"
    raise ModelLoadError("no VAE tensors found: expected diffusers (encoder.down_blocks.*) or original "
                         "LDM/ComfyUI/BFL (encoder.down.*) key names, optionally under first_stage_model. or vae.")


_NAMES = {  # per key format: the encoder's blocks, a level's width, the mid-block attention's prefix
    "diffusers": dict(level=r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.",
                      width="encoder.down_blocks.{i}.resnets.0.conv1.weight",
                      attention="encoder.mid_block.attentions.0."),
    "ldm": dict(level=r"encoder\.down\.(\d+)\.block\.(\d+)\.",
                width="encoder.down.{i}.block.0.conv1.weight",
                attention="encoder.mid.attn_1."),
}
# Tensors training leaves in VAE files (A1111's loader drops the same): not part of the model.
TRAINING_ONLY = ("loss.", "model_ema.")
# diffusers' attention names before 0.14 (e.g. stabilityai/sd-vae-ft-mse), as from_pretrained converts them.
_LEGACY_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def drop_training_tensors(state: dict) -> tuple[dict, list]:
    """The state without tensors training leaves behind (loss.*, model_ema.*), and the names dropped."""
    dropped = [k for k in state if k.startswith(TRAINING_ONLY)]
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}, dropped


def modernize_attention(state: dict) -> dict:
    """diffusers-named tensors with legacy attention names (query/key/value/proj_attn) under today's names."""
    def rename(key):
        m = re.match(r"((?:en|de)coder\.mid_block\.attentions\.0\.)(query\.|key\.|value\.|proj_attn\.)(.*)", key)
        return m.group(1) + _LEGACY_ATTENTION[m.group(2)] + m.group(3) if m else key

    return {rename(k): v for k, v in state.items()}


def _shape(state: dict, key: str, prefix: str) -> tuple:
    if key not in state:
        raise ModelLoadError(f"tensor {prefix}{key} is missing: it is where an AutoencoderKL's architecture is read")
    return tuple(state[key].shape)


def read_architecture(state: dict, prefix: str = "") -> dict:
    """The architecture keys of an AutoencoderKL config, read from tensor names and shapes (prefix stripped)."""
    fmt = key_format(state)
    names = _NAMES[fmt]
    levels, level0_blocks = set(), set()
    for key in state:
        m = re.match(names["level"], key)
        if m:
            levels.add(int(m.group(1)))
            if m.group(1) == "0":
                level0_blocks.add(int(m.group(2)))
    if levels != set(range(len(levels))):
        raise ModelLoadError(f"encoder levels {sorted(levels)} are not numbered 0..n-1")
    widths = [_shape(state, names["width"].format(i=i), prefix)[0] for i in range(len(levels))]
    return {
        "in_channels": _shape(state, "encoder.conv_in.weight", prefix)[1],
        "out_channels": _shape(state, "decoder.conv_out.weight", prefix)[0],
        "latent_channels": _shape(state, "decoder.conv_in.weight", prefix)[1],
        "block_out_channels": widths,
        "layers_per_block": len(level0_blocks),
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": any(k.startswith(names["attention"]) for k in state),
    }


def ldm_name(key: str, levels: int) -> str:
    """The original (LDM / A1111 / ComfyUI / BFL) name of a diffusers AutoencoderKL tensor.

    The inverse of diffusers' convert_ldm_vae_checkpoint, so a file in original names is checked
    tensor by tensor and its errors name its own keys. Decoder levels count the other way there.
    """
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    k = re.sub(r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block.", k)
    k = re.sub(r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample.", k)
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", k)
    if m:
        part = "block." if m.group(2) == "resnets" else "upsample."
        k = f"decoder.up.{levels - 1 - int(m.group(1))}.{part}{m.group(3)}"
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda mm: f".mid.block_{int(mm.group(1)) + 1}.", k)
    if ".mid_block.attentions.0." in k:
        k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
        for new, old in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
            k = k.replace(new, old)
    return k.replace("conv_shortcut", "nin_shortcut")


def expected_shapes(config: dict, fmt: str) -> dict:
    """{tensor name in `fmt`: shape} of an AutoencoderKL of `config`, built on the meta device (no memory)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        state = AutoencoderKL.from_config(config).state_dict()
    levels = len(config["block_out_channels"])
    out = {}
    for key, tensor in state.items():
        name = ldm_name(key, levels) if fmt == "ldm" else key
        shape = tuple(tensor.shape)
        if fmt == "ldm" and ".mid.attn_1." in name and len(shape) == 2:
            shape = (*shape, 1, 1)  # original attention projections are 1×1 convs
        out[name] = shape
    return out


def check_tensors(state: dict, config: dict, fmt: str, prefix: str) -> None:
    """Every tensor of the file must be one of `config`'s, with its shape: name the first that is not."""
    expected = expected_shapes(config, fmt)
    what = _describe(config)
    for key, tensor in state.items():
        shape = tuple(tensor.shape)
        if key not in expected:
            raise ModelLoadError(f"tensor {prefix}{key} {list(shape)} fits no AutoencoderKL family: it is not "
                                 f"part of the architecture read from the file ({what})")
        want = expected[key]
        # Some converters store original attention projections as Linear (C, C); diffusers' converter takes both.
        linear_attention = fmt == "ldm" and ".mid.attn_1." in key and shape == want[:2]
        if shape != want and not linear_attention:
            raise ModelLoadError(f"tensor {prefix}{key} has shape {list(shape)}, expected {list(want)} "
                                 f"for the architecture read from the file ({what})")
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelLoadError(f"tensor {prefix}{missing[0]} is missing ({len(missing)} missing in all) "
                             f"for the architecture read from the file ({what})")


def _describe(config: dict) -> str:
    return (f"latent_channels={config['latent_channels']}, block_out_channels={list(config['block_out_channels'])}, "
            f"layers_per_block={config['layers_per_block']}, quant convs "
            f"{'present' if config['use_quant_conv'] else 'absent'}")


def candidates(latent_channels: int) -> list:
    return [n for n in NAMES if family_config(n)["latent_channels"] == latent_channels]


def choose_family(architecture: dict, family: str | None, where: str) -> tuple[str, str | None]:
    """The family of a weights file, and a note to print when it was not given but assumed."""
    channels = architecture["latent_channels"]
    fitting = candidates(channels)
    if family is not None:
        wanted = family_config(family)["latent_channels"]
        if wanted != channels:
            raise ModelLoadError(f"{where} has {channels} latent channels (decoder.conv_in.weight), but --family "
                                 f"{family} has {wanted}" + (f"; it can be {' or '.join(fitting)}" if fitting else ""))
        return family, None
    if not fitting:
        by_channels = ", ".join(f"{family_config(n)['latent_channels']} ({n})" for n in NAMES)
        raise ModelLoadError(f"{where}: tensor decoder.conv_in.weight has {channels} latent channels, which fits no "
                             f"AutoencoderKL family (latent channels: {by_channels})")
    if len(fitting) > 1 and DEFAULT in fitting:
        return DEFAULT, (f"{where} has {channels} latent channels: SD1.x/2.x and SDXL VAEs have the same tensors; "
                         f"taking --family {DEFAULT} (pass --family {' or '.join(fitting)} to choose)")
    if len(fitting) > 1:
        raise ModelLoadError(f"{where} has {channels} latent channels, which {' and '.join(fitting)} VAEs share with "
                             f"identical tensors but different latent scales: pass --family "
                             f"{' or '.join(fitting)} ({'; '.join(_scale(n) for n in fitting)})")
    return fitting[0], None


def _scale(name: str) -> str:
    c = family_config(name)
    shift = f", shift_factor {c['shift_factor']}" if c.get("shift_factor") is not None else ""
    return f"{name}: scaling_factor {c['scaling_factor']}{shift}"


def config_for_file(architecture: dict, family: str) -> dict:
    """The family's published config with the architecture read from the file's tensors."""
    return {**family_config(family), **architecture}


def differs_from_published(architecture: dict, family: str) -> list:
    published = family_config(family)
    # Block types follow from the widths, so they are not news of their own.
    keys = [k for k in ARCHITECTURE_KEYS if not k.endswith("block_types")]
    return [k for k in keys if effective(published, k) != architecture[k]]
