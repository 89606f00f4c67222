"""Tiny VAEs of each family's latent contract (channels, quant convs, scale, shift), and original key names."""
from __future__ import annotations

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
        out[prefix + families.ldm_name(key, levels)] = tensor.contiguous()
    return out
