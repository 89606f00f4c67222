"""The GPU verify's sizing, on CPU: which shapes its fp32 reference runs at for a given free memory.

Expected sizes worked out by hand for the SDXL VAE (block_out_channels 128, 256, 512, 512; mid-block
attention) from the documented figure, 20 bytes per image pixel per full-resolution channel
(decoder 256, encoder 128), plus fp32 attention scores, 4 × (latent pixels)², for one image:
  decoder 512²:  20·256·262144  + 4·4096²  = 1.41e9 B (1.31 GiB)
  decoder 776×760 (off-grid 97×95 latents): 3.02e9 + 4·9215² = 3.36e9 B (3.13 GiB)
  decoder 1024²: 5.37e9 + 4·16384² = 6.44e9 B (6.0 GiB)
  decoder 1536²: 12.08e9 + 4·36864² = 17.52e9 B (16.3 GiB)
  encoder 1536²: 6.04e9 + 5.44e9 = 11.48e9 B (10.7 GiB)
The reference may plan on 80 % of the free memory.
"""
from __future__ import annotations

import json
from importlib import resources

import pytest

from trtvae.components import component_specs
from trtvae.export.verify import reference_shapes

GIB = 2 ** 30
DEC = {"min": (1, 4, 64, 64), "opt": (1, 4, 128, 128), "max": (4, 4, 192, 192)}
ENC = {"min": (1, 3, 512, 512), "opt": (1, 3, 1024, 1024), "max": (4, 3, 1536, 1536)}
OFF_GRID = (1, 4, 97, 95)


@pytest.fixture(scope="module")
def sdxl():
    config = json.loads(resources.files("trtvae.export.configs").joinpath("sdxl_vae.json").read_text())
    return config, component_specs(config)


@pytest.mark.parametrize("free_gib,shapes,skipped", [
    (24, [DEC["min"], DEC["opt"], OFF_GRID, DEC["max"]], []),
    (16, [DEC["min"], DEC["opt"], OFF_GRID], [("4×4×192×192", "16.3")]),
    (5, [DEC["min"], OFF_GRID], [("1×4×128×128", "6.0"), ("4×4×192×192", "16.3")]),
    (1, [], [("1×4×64×64", "1.3"), ("1×4×128×128", "6.0"), ("1×4×97×95", "3.1"), ("4×4×192×192", "16.3")]),
])
def test_decoder_shapes_for_free_memory(sdxl, free_gib, shapes, skipped):
    config, specs = sdxl
    chosen, notes = reference_shapes(free_gib * GIB, DEC, specs["decoder"], config)
    assert chosen == shapes
    assert len(notes) == len(skipped)
    for note, (shape, gib) in zip(notes, skipped):
        assert note.startswith(f"decoder at {shape} not checked") and f"about {gib} GiB per image" in note, note
        assert f"{free_gib:.1f} GiB free" in note


def test_the_encoder_max_fits_where_the_decoders_does_not(sdxl):
    config, specs = sdxl
    chosen, notes = reference_shapes(16 * GIB, ENC, specs["encoder"], config)
    assert chosen[-1] == ENC["max"] and notes == []
    chosen, notes = reference_shapes(13 * GIB, ENC, specs["encoder"], config)  # 10.4 GiB to plan on
    assert ENC["max"] not in chosen and "about 10.7 GiB per image" in notes[0]


def test_min_opt_and_off_grid_come_before_max_and_batch_is_not_multiplied(sdxl):
    config, specs = sdxl
    # The reference runs one image at a time: batch 4 at 1536² needs what one image needs.
    one = {"min": (1, 4, 64, 64), "opt": (1, 4, 128, 128), "max": (1, 4, 192, 192)}
    assert reference_shapes(24 * GIB, one, specs["decoder"], config)[0][-1] == (1, 4, 192, 192)
    assert reference_shapes(24 * GIB, DEC, specs["decoder"], config)[0][-1] == (4, 4, 192, 192)


def test_the_sliced_reference_equals_the_batched_one():
    import torch

    from conftest import make_tiny_vae
    from trtvae.export.verify import _sliced, reference

    vae = make_tiny_vae()
    z = torch.randn(3, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_sliced(vae, "decoder", z), reference(vae, "decoder", z), rtol=1e-5, atol=1e-5)
    x = torch.rand(3, 3, 12, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar = _sliced(vae, "encoder", x)
    dist = reference(vae, "encoder", x)
    assert mean.shape == dist.mean.shape == (3, 4, 6, 5)
    assert torch.allclose(mean, dist.mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logvar, dist.logvar, rtol=1e-5, atol=1e-5)
