"""Latent scaling as diffusers' pipelines apply it around `vae.decode`; it stays outside the graphs.

Written once for everyone who makes or receives pipeline latents: the server's decode_image,
the verify step and the fp16 calibration.
"""
from __future__ import annotations


def unscale(latents, config):
    """Pipeline latents → what `vae.decode` takes: `latents / scaling_factor + shift_factor`, or with
    per-channel `latents_mean`/`latents_std` (where the config has them) `latents * std / scaling_factor + mean`."""
    sf = float(config.get("scaling_factor") or 1.0)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        return latents * latents.new_tensor(std).view(shape) / sf + latents.new_tensor(mean).view(shape)
    shift = config.get("shift_factor")
    return latents / sf + (float(shift) if shift is not None else 0.0)
