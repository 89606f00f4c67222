"""One weights file's VAE tensors under diffusers' names, and the check that they are one AutoencoderKL.

Original names (LDM / A1111 / ComfyUI / BFL: `encoder.down.0.block.0`, `mid.attn_1.q`) go through
diffusers' own `convert_ldm_vae_checkpoint`, legacy diffusers attention names (`query`, `proj_attn`)
through the conversion `from_pretrained` applies. Every error names the file's own tensor: the
conversion is run once more on shapeless stand-ins, and each converted tensor is traced back to the
stand-in it came from, so no inverse of diffusers' mapping is written here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError

# Tensors training leaves in VAE files (A1111's loader drops the same): not part of the model.
TRAINING_ONLY = ("loss.", "model_ema.")


@dataclass
class Checkpoint:
    state: dict  # diffusers name → tensor
    names: dict  # diffusers name → the file's own name (prefix stripped)
    shapes: dict  # the file's own name → its shape in the file
    prefix: str  # "first_stage_model.", "vae." or ""
    key_names: str  # "diffusers" or "ldm"
    dropped: list = field(default_factory=list)  # training-only tensors left out
    architecture: dict = field(default_factory=dict)  # AutoencoderKL config keys read from the tensors

    def file_name(self, key: str) -> str:
        """A diffusers tensor name as the file writes it; for a missing one, by its weight/bias sibling."""
        if key in self.names:
            return self.prefix + self.names[key]
        stem, _, last = key.rpartition(".")
        sibling = f"{stem}.{'bias' if last == 'weight' else 'weight'}"
        if sibling in self.names:
            return self.prefix + self.names[sibling].rpartition(".")[0] + "." + last
        return f"{self.prefix}{key} (diffusers' name)"


def parse(state: dict) -> Checkpoint:
    """The VAE tensors of a whole checkpoint or a VAE-only file, renamed to diffusers', architecture read."""
    state, prefix = _strip_prefix(state)
    dropped = [k for k in state if k.startswith(TRAINING_ONLY)]
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
    fmt = _key_format(state)
    converted, names = _to_diffusers(state, fmt)
    ckpt = Checkpoint(converted, names, {k: tuple(v.shape) for k, v in state.items()}, prefix, fmt, dropped)
    ckpt.architecture = _architecture(ckpt)
    return ckpt


def _strip_prefix(state: dict) -> tuple[dict, str]:
    # diffusers' own list: `first_stage_model.` (SD/SD3 checkpoints) and `vae.` (ComfyUI saves).
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS

    for prefix in LDM_VAE_KEYS:
        if any(k.startswith(prefix + "decoder.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix
    return dict(state), ""


def _key_format(state: dict) -> str:
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
        return "ldm"
    raise ModelLoadError("no VAE tensors found: expected diffusers (encoder.down_blocks.*) or original "
                         "LDM/ComfyUI/BFL (encoder.down.*) key names, optionally under first_stage_model. or vae.")


def _convert(state: dict, fmt: str) -> dict:
    if fmt == "diffusers":  # legacy attention names, renamed as from_pretrained does (tensors untouched)
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            model = AutoencoderKL.from_config({})  # the mid-block attention paths are the same in every VAE
        return model._fix_state_dict_keys_on_load(dict(state))
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    levels = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
    blocks = {"down_block_types": [None] * (max(levels) + 1 if levels else 0)}
    blocks["up_block_types"] = blocks["down_block_types"]
    try:
        converted = convert_ldm_vae_checkpoint(state, blocks)
    except KeyError as e:  # a bias without its weight, or the other way round
        raise ModelLoadError(f"tensor {e.args[0]} is missing beside its sibling") from None
    return {k: v for k, v in converted.items() if v is not None}  # None: a tensor the file lacks


def _to_diffusers(state: dict, fmt: str) -> tuple[dict, dict]:
    """The converted state, and for each converted tensor the file's name it came from."""
    stand_ins = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    origin = {id(t): k for k, t in stand_ins.items()}
    traced = _convert(stand_ins, fmt)
    # A converted tensor is a stand-in itself or a view of one (1×1 conv attention → Linear).
    names = {key: origin[id(t if t._base is None else t._base)] for key, t in traced.items()}
    return _convert(state, fmt), names


def _shape(ckpt: Checkpoint, key: str) -> tuple:
    if key not in ckpt.state:
        raise ModelLoadError(f"tensor {ckpt.file_name(key)} is missing: it is where an AutoencoderKL's "
                             "architecture is read")
    return tuple(ckpt.state[key].shape)


def _architecture(ckpt: Checkpoint) -> dict:
    """The architecture keys of an AutoencoderKL config, read from tensor names and shapes."""
    levels, level0_blocks = set(), set()
    for key in ckpt.state:
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", key):
            levels.add(int(m.group(1)))
            if m.group(1) == "0":
                level0_blocks.add(int(m.group(2)))
    if levels != set(range(len(levels))):
        raise ModelLoadError(f"encoder levels {sorted(levels)} are not numbered 0..n-1")
    widths = [_shape(ckpt, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(len(levels))]
    return {
        "in_channels": _shape(ckpt, "encoder.conv_in.weight")[1],
        "out_channels": _shape(ckpt, "decoder.conv_out.weight")[0],
        "latent_channels": _shape(ckpt, "decoder.conv_in.weight")[1],
        "block_out_channels": widths,
        "layers_per_block": len(level0_blocks),
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "use_quant_conv": "quant_conv.weight" in ckpt.state,
        "use_post_quant_conv": "post_quant_conv.weight" in ckpt.state,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.0.") for k in ckpt.state),
    }


def check(ckpt: Checkpoint, config: dict) -> None:
    """Every tensor must be one of `config`'s AutoencoderKL, with its shape, and none may be missing.

    Named by the file's own names. diffusers' converter silently skips what it does not know, and
    loading would leave a missing tensor at its random initial value, hence this check first.
    """
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoencoderKL.from_config(config).state_dict().items()}
    what = (f"latent_channels={config['latent_channels']}, block_out_channels={list(config['block_out_channels'])}, "
            f"layers_per_block={config['layers_per_block']}, quant convs "
            f"{'present' if config['use_quant_conv'] else 'absent'}")
    unused = set(ckpt.shapes) - set(ckpt.names.values())
    strays = [ckpt.names[k] for k in ckpt.state if k not in expected] + sorted(unused)
    if strays:
        raise ModelLoadError(f"tensor {ckpt.prefix}{strays[0]} {list(ckpt.shapes[strays[0]])} fits no AutoencoderKL "
                             f"family: it is not part of the architecture read from the file ({what})")
    for key, tensor in ckpt.state.items():
        if tuple(tensor.shape) != expected[key]:
            name = ckpt.names[key]
            raise ModelLoadError(f"tensor {ckpt.prefix}{name} has shape {list(ckpt.shapes[name])}, expected "
                                 f"{list(expected[key])} for the architecture read from the file ({what})")
    missing = [k for k in expected if k not in ckpt.state]
    if missing:
        raise ModelLoadError(f"tensor {ckpt.file_name(missing[0])} is missing ({len(missing)} missing in all) "
                             f"for the architecture read from the file ({what})")
