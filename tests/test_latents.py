"""Latent unscaling as diffusers' pipelines do it (SD1/SDXL, SD3/FLUX shift, per-channel mean/std)."""
from __future__ import annotations

import torch

from trtvae.latents import unscale


def test_unscale_follows_each_pipeline_family():
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unscale(z, {"scaling_factor": 0.13025}), z / 0.13025)  # SDXL / SD1
    assert torch.allclose(unscale(z, {"scaling_factor": 0.3611, "shift_factor": 0.1159}), z / 0.3611 + 0.1159)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 1.5]
    # SDXL pipelines with latents_mean/std: latents * std / sf + mean, per channel.
    out = unscale(z, {"scaling_factor": 0.5, "latents_mean": mean, "latents_std": std, "shift_factor": 9.0})
    ref = z * torch.tensor(std).view(1, 4, 1, 1) / 0.5 + torch.tensor(mean).view(1, 4, 1, 1)
    assert torch.allclose(out, ref)
    assert torch.equal(unscale(z, {"scaling_factor": 0.5, "shift_factor": None, "latents_mean": None}), z / 0.5)
