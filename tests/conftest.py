"""Shared fixtures: a tiny AutoencoderKL saved as a diffusers folder, and its exports (built once per session)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers import AutoencoderKL

# Tests marked `tensorrt` skip without it: `from conftest import HAS_TRT`.
HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()

TINY_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.5,
)


def make_tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**{**TINY_CONFIG, **overrides}).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vae")
    make_tiny_vae().save_pretrained(path)
    return path


def _export(tmp_path_factory, tiny_dir, precision):
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    out = tmp_path_factory.mktemp(f"tiny_{precision}")
    run_export(ExportOptions(model=str(tiny_dir), precision=precision, out=out))
    return out


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory, tiny_dir):
    return _export(tmp_path_factory, tiny_dir, "fp32")


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory, tiny_dir):
    return _export(tmp_path_factory, tiny_dir, "fp16")


@pytest.fixture(scope="session")
def tiny_ref(tiny_dir):
    return AutoencoderKL.from_pretrained(tiny_dir).eval().requires_grad_(False)
