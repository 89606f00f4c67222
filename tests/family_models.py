"""Tiny VAEs of each family's latent contract (channels, quant convs, scale, shift), and original key names."""
from __future__ import annotations

import re

from conftest import make_tiny_vae

from trtvae.export import families

# Single files are read with the family's norm_num_groups (32: no tensor records it), so their widths are multiples.
FILE_ARCH = dict(block_out_channels=[32, 32], norm_num_groups=32)


def contract(family: str) -> dict:
    """What a family's config fixes beyond the architecture."""
    c = families.family_config(family)
    keys = ("latent_channels", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
            "force_upcast")
    return {k: c[k] for k in keys if k in c}


def family_vae(family: str, seed: int = 0, **overrides):
    return make_tiny_vae(seed, **{**contract(family), **overrides})


def ldm_state(vae, prefix: str = "") -> dict:
    """The VAE's tensors under original (LDM / ComfyUI / BFL) names, attention as 1×1 convs."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        if ".attentions." in key and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[prefix + ldm_name(key, levels)] = tensor.contiguous()
    return out


def ldm_name(key: str, levels: int) -> str:
    """The original (LDM / A1111 / ComfyUI / BFL) name of a diffusers AutoencoderKL tensor, written here
    from the original checkpoints' layout, not taken from the loader under test. Decoder levels count
    the other way there."""
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
