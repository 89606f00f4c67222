"""Tiling and slicing match diffusers' AutoencoderKL; automatic tiling and padding follow `_spatial_limits`."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from trtvae import OrtVae
from trtvae.metrics import REL_L2_THRESHOLD, compare
from trtvae.runtime.tiling_options import TilingNotice

FP32 = REL_L2_THRESHOLD["fp32"]


class SpyVae(OrtVae):
    """OrtVae with backend limits set by the test, recording every input the backend runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits: dict = {}
        self.batch_limit = None
        self.calls: list = []

    def _spatial_limits(self, component):
        return self.limits.get(component)

    def _batch_ranges(self, component, shape):
        return [(1, self.batch_limit or shape[0])]

    def _run(self, component, x):
        self.calls.append((component, tuple(x.shape)))
        return super()._run(component, x)


@pytest.fixture
def vae(tiny_fp32):
    v = SpyVae.from_pretrained(tiny_fp32)
    v.tiling_mode = "blend"  # automatic tiling too compares with diffusers' here; exact: test_exact_tiling.py
    return v


@pytest.fixture
def ref(tiny_dir):
    return AutoencoderKL.from_pretrained(tiny_dir).eval().requires_grad_(False)


def _latents(b=2, h=28, w=25, seed=0):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _images(b=2, h=56, w=50, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _tile_like(*models, sample=None, latent=None, overlap=None, tiling=True):
    for m in models:
        if sample is not None:
            m.tile_sample_min_size = sample
        if latent is not None:
            m.tile_latent_min_size = latent
        if overlap is not None:
            m.tile_overlap_factor = overlap
        if tiling:  # ours in diffusers' own (blend) mode: these tests compare with diffusers' tiling
            m.enable_tiling(mode="blend") if isinstance(m, OrtVae) else m.enable_tiling()


def _assert_close(ours, theirs, bound=FP32):
    stats = compare(ours, theirs)
    assert ours.shape == theirs.shape
    assert stats.nonfinite == 0 and stats.rel_l2 <= bound, stats


def test_tile_defaults_follow_diffusers(vae, ref):
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == (
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor)
    assert vae.use_tiling is False and vae.use_slicing is False
    vae.enable_tiling()
    vae.enable_slicing()
    assert vae.use_tiling and vae.use_slicing
    vae.disable_tiling()
    vae.disable_slicing()
    assert not vae.use_tiling and not vae.use_slicing


@pytest.mark.parametrize("tiles", [{}, {"sample": 24, "latent": 12, "overlap": 1 / 3}])
def test_tiled_decode_matches_diffusers(vae, ref, tiles):
    _tile_like(vae, ref, **tiles)
    z = _latents()
    with torch.no_grad():
        theirs = ref.decode(z).sample
        ref.disable_tiling()
        untiled = ref.decode(z).sample
    ours = vae.decode(z).sample
    _assert_close(ours, theirs)
    # Tiling really happened: every backend call saw at most one tile, and the result differs from one pass.
    assert all(max(shape[2:]) <= vae.tile_latent_min_size for _, shape in vae.calls)
    assert len(vae.calls) >= 9
    assert compare(ours, untiled).rel_l2 > 100 * FP32


@pytest.mark.parametrize("tiles", [{}, {"sample": 24, "latent": 12, "overlap": 1 / 3}])
def test_tiled_encode_matches_diffusers(vae, ref, tiles):
    _tile_like(vae, ref, **tiles)
    x = _images()
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
    ours = vae.encode(x).latent_dist
    _assert_close(ours.mean, theirs.mean)
    _assert_close(ours.logvar, theirs.logvar)
    _assert_close(ours.sample(torch.Generator().manual_seed(3)), theirs.sample(torch.Generator().manual_seed(3)))
    assert all(max(shape[2:]) <= vae.tile_sample_min_size for _, shape in vae.calls)


def test_input_within_one_tile_is_not_tiled(vae, ref):
    _tile_like(vae, ref)
    z = _latents(h=16, w=12)
    ours = vae.decode(z).sample
    with torch.no_grad():
        _assert_close(ours, ref.decode(z).sample)
    assert vae.calls == [("decoder", (2, 4, 16, 12))]


def test_encoder_tiles_must_stay_on_the_latent_grid(vae):
    _tile_like(vae, sample=26)  # stride int(26 · 0.75) = 19: odd image offsets have no latent pixel
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(_images(b=1))


def test_slicing_runs_one_image_at_a_time_and_changes_nothing(vae):
    z, x = _latents(b=3, h=10, w=6), _images(b=3, h=20, w=12)
    dec, enc = vae.decode(z).sample, vae.encode(x).latent_dist.parameters
    vae.calls.clear()
    vae.enable_slicing()
    _assert_close(vae.decode(z).sample, dec, 1e-6)
    _assert_close(vae.encode(x).latent_dist.parameters, enc, 1e-6)
    assert [shape[0] for _, shape in vae.calls] == [1] * 6


def test_slicing_and_tiling_together_match_diffusers(vae, ref):
    _tile_like(vae, ref)
    vae.enable_slicing()
    ref.enable_slicing()
    z = _latents(b=2, h=20, w=30)
    with torch.no_grad():
        theirs = ref.decode(z).sample
    _assert_close(vae.decode(z).sample, theirs)
    assert {shape[0] for _, shape in vae.calls} == {1}


def test_max_batch_splits_tiles_too(vae, ref):
    _tile_like(vae, ref)
    vae.batch_limit = 1
    z = _latents(b=3, h=20, w=20)
    with torch.no_grad():
        theirs = ref.decode(z).sample
    _assert_close(vae.decode(z).sample, theirs)
    assert {shape[0] for _, shape in vae.calls} == {1}


def test_oversized_input_is_tiled_automatically_with_one_notice(vae, ref):
    # The backend takes at most 12×12 latents: smaller than the default 16-latent tile, so tiles shrink to 12.
    vae.limits["decoder"] = ((1, 1), (12, 12))
    _tile_like(ref, sample=24, latent=12)
    z = _latents()
    with pytest.warns(TilingNotice, match="max 12×12"):
        ours = vae.decode(z).sample
    with warnings.catch_warnings():
        warnings.simplefilter("error", TilingNotice)
        again = vae.decode(z).sample  # the notice is given once
    with torch.no_grad():
        theirs = ref.decode(z).sample
    _assert_close(ours, theirs)
    assert torch.equal(ours, again)
    assert vae.use_tiling is False  # automatic tiling does not switch the user's setting
    assert all(max(shape[2:]) <= 12 for _, shape in vae.calls)
    # Within the limits nothing is tiled.
    vae.calls.clear()
    vae.decode(_latents(h=12, w=9))
    assert vae.calls == [("decoder", (2, 4, 12, 9))]


def test_oversized_encode_picks_tiles_on_the_latent_grid(vae, ref):
    # Max 20 px: 20 and 18 give odd strides (15, 13) at overlap 0.25, so the tile is 16 px (stride 12).
    vae.limits["encoder"] = ((2, 2), (20, 20))
    _tile_like(ref, sample=16, latent=8)
    x = _images()
    with pytest.warns(TilingNotice):
        ours = vae.encode(x).latent_dist.parameters
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist.parameters
    _assert_close(ours, theirs)
    assert all(max(shape[2:]) <= 16 for _, shape in vae.calls)


def test_user_tiles_larger_than_the_backend_max_shrink(vae, ref):
    vae.limits["decoder"] = ((1, 1), (12, 12))
    vae.enable_tiling(mode="blend")  # default tile is 16 latents, over the max
    _tile_like(ref, sample=24, latent=12)
    z = _latents(b=1)
    with pytest.warns(TilingNotice):
        ours = vae.decode(z).sample
    with torch.no_grad():
        _assert_close(ours, ref.decode(z).sample)


def test_small_input_is_padded_to_the_backend_min_and_cropped(vae, ref):
    vae.limits["decoder"] = ((8, 10), (64, 64))
    vae.limits["encoder"] = ((15, 15), (64, 64))  # min rounds up to the latent grid: 16
    z, x = _latents(b=1, h=5, w=3), _images(b=1, h=6, w=10)
    with pytest.warns(TilingNotice, match=r"decoder input 5×3 is smaller .* differs from diffusers'"):
        dec = vae.decode(z).sample
    with pytest.warns(TilingNotice, match="encoder input 6×10 is smaller"):
        enc = vae.encode(x).latent_dist.parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", TilingNotice)
        vae.decode(z)  # once per shape
    vae.calls.pop()
    assert vae.calls == [("decoder", (1, 4, 8, 10)), ("encoder", (1, 3, 16, 16))]
    with torch.no_grad():
        dec_ref = ref.decode(F.pad(z, (0, 7, 0, 3), mode="replicate")).sample[:, :, :10, :6]
        enc_ref = ref.encode(F.pad(x, (0, 6, 0, 10), mode="replicate")).latent_dist.parameters[:, :, :3, :5]
    _assert_close(dec, dec_ref)
    _assert_close(enc, enc_ref)


def _is_slice_of(t, z):
    h, w = t.shape[-2:]
    return any(torch.equal(t, z[..., a:a + h, b:b + w])
               for a in range(z.shape[-2] - h + 1) for b in range(z.shape[-1] - w + 1))


@pytest.mark.parametrize("least", [4, 20])
def test_tiles_below_the_min_are_widened_into_the_input_not_padded(vae, ref, least):
    # Tiles of 16 latents at stride 12 over a width of 37: the last column of tiles is 1 latent wide.
    # With a min of 4 only that column is widened (backwards); with 20, every tile is (the first ones forwards).
    vae.limits["decoder"] = ((least, least), (32, 32))
    _tile_like(vae, ref)
    z = _latents(b=1, h=16 + 12 + 12 + 4, w=37)
    seen = []
    run = vae._run
    vae._run = lambda component, t: seen.append(t.clone()) or run(component, t)
    ours = vae.decode(z).sample
    with torch.no_grad():
        theirs = ref.decode(z).sample
        ref.disable_tiling()
        whole = ref.decode(z).sample
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    assert all(least <= s <= 32 for t in seen for s in t.shape[2:])
    assert all(_is_slice_of(t, z) for t in seen)  # real input around each tile, no padding
    if least == 4:
        exact = 3 * 24  # three full tile columns, each keeping 24 output pixels, are untouched
        _assert_close(ours[..., :exact], theirs[..., :exact])
    # Widened tiles see more of the image than diffusers' tiles: no farther than those from a one-pass decode
    # (with random weights tiling itself moves the result by about 0.26 here; padding to 20 gave 0.37).
    assert compare(ours, whole).rel_l2 <= 1.02 * compare(theirs, whole).rel_l2
