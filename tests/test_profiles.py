"""Engine profiles in user terms, choosing one at run time, and --components: pure Python, no TensorRT."""
from __future__ import annotations

import pytest

from trtvae.components import component_specs
from trtvae.errors import OptionError
from trtvae.profiles import (batch_ranges, component_shapes, make_profile, parse_profile_option, select_profile,
                             spatial_limits, verify_shapes)

SDXL = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
SPECS = component_specs(SDXL)


# --- profiles in user terms ---------------------------------------------------------------
def test_default_profile_in_latents_and_pixels():
    p = make_profile(8)
    assert p.batch == (1, 1, 4) and p.height == (512, 1024, 1536) and p.width == (512, 1024, 1536)
    dec = component_shapes(p, SPECS["decoder"], 8)
    assert dec == {"min": [1, 4, 64, 64], "opt": [1, 4, 128, 128], "max": [4, 4, 192, 192]}
    enc = component_shapes(p, SPECS["encoder"], 8)
    assert enc == {"min": [1, 3, 512, 512], "opt": [1, 3, 1024, 1024], "max": [4, 3, 1536, 1536]}


def test_static_profile_is_width_by_height():
    p = make_profile(8, batch="2", static="1024x768")
    assert p.height == (768, 768, 768) and p.width == (1024, 1024, 1024) and p.batch == (2, 2, 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch="4-1"), r"--batch: '4-1' has min 4 > max 1"),
    (dict(batch="0-2"), "at least 1"),
    (dict(batch="a-2"), "not a positive whole number"),
    (dict(resolution="1536-512"), "min 1536 > max 512"),
    (dict(resolution="500-1536"), "500 px is not a multiple of the VAE's spatial factor 8"),
    (dict(resolution="512-1024", opt=2048), "--opt 2048 is outside --resolution 512-1024"),
    (dict(static="1024"), "not WIDTHxHEIGHT"),
    (dict(static="1020x1024"), "1020 px is not a multiple"),
])
def test_nonsense_profiles_are_rejected(kwargs, message):
    with pytest.raises(OptionError, match=message):
        make_profile(8, **kwargs)


def test_profile_option_syntax():
    p = parse_profile_option("batch=1-2,resolution=512-1024,opt=768", 8)
    assert p.batch == (1, 1, 2) and p.height == (512, 768, 1024)
    assert parse_profile_option("batch=1,static=1024x1024", 8).height == (1024,) * 3
    with pytest.raises(OptionError, match="not one of"):
        parse_profile_option("batches=1-2", 8)
    with pytest.raises(OptionError, match="exclude each other"):
        parse_profile_option("static=1024x1024,resolution=512-1024", 8)


def _profiles():
    small = component_shapes(make_profile(8, batch="1-8", resolution="512-1024", opt=768), SPECS["decoder"], 8)
    big = component_shapes(make_profile(8, batch="1-2", resolution="512-2048", opt=1024), SPECS["decoder"], 8)
    return [big, small]


def test_select_profile_picks_the_tightest_containing_one():
    profiles = _profiles()
    assert select_profile(profiles, (1, 4, 96, 96)) == 1  # both hold it: the smaller range wins
    assert select_profile(profiles, (1, 4, 200, 100)) == 0  # only the big one holds 1600 px
    assert select_profile(profiles, (4, 4, 200, 100)) is None  # batch 4 at 1600 px: neither
    assert select_profile(profiles, (1, 4, 32, 32)) is None  # below every min


def test_batch_ranges_and_spatial_limits():
    profiles = _profiles()
    assert batch_ranges(profiles, (16, 4, 96, 96)) == [(1, 2), (1, 8)]
    assert batch_ranges(profiles, (16, 4, 200, 200)) == [(1, 2)]
    assert batch_ranges(profiles, (1, 4, 300, 300)) == []
    assert spatial_limits(profiles) == ((64, 64), (256, 256))
    # A dynamic 512-1024 profile and a static 1536 one: 1200 px is in neither, so the dynamic one is the range.
    holes = [component_shapes(make_profile(8, resolution="512-1024"), SPECS["decoder"], 8),
             component_shapes(make_profile(8, batch="1", static="1536x1536"), SPECS["decoder"], 8)]
    assert spatial_limits(holes) == ((64, 64), (128, 128))


def test_verify_shapes_cover_min_opt_max_and_off_grid():
    dec = component_shapes(make_profile(8), SPECS["decoder"], 8)
    shapes = verify_shapes(dec)
    assert shapes[:3] == [(1, 4, 64, 64), (1, 4, 128, 128), (4, 4, 192, 192)]
    off_grid = shapes[3:]
    assert len(off_grid) == 2
    for s in off_grid:
        assert select_profile([dec], s) == 0
        assert s[2] != s[3] and s not in [tuple(v) for v in dec.values()]
    enc = component_shapes(make_profile(8), SPECS["encoder"], 8)
    for s in verify_shapes(enc, multiple=8):
        assert s[2] % 8 == 0 and s[3] % 8 == 0 and select_profile([enc], s) == 0


def test_components_parsing():
    from trtvae.components import parse_components

    assert parse_components("decoder,decoder, encoder") == ("decoder", "encoder")
    assert parse_components(("encoder",)) == ("encoder",)
    for bad in ("", "decoder,unet", ("decoder", None)):
        with pytest.raises(OptionError, match="--components"):
            parse_components(bad)
