"""Exact tiling equals the untiled run (ONNX Runtime CPU): tiny and SDXL-layout models, fp32/fp16, decode/encode.

Every expectation comes from the untiled graph (decoder.onnx / encoder.onnx run whole), from diffusers'
PyTorch model, or from diffusers' own tiled decode: never from the segment graphs under test.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
from conftest import make_tiny_vae
from diffusers import AutoencoderKL

from trtvae import OrtVae
from trtvae.export.families import family_config
from trtvae.manifest import ManifestError
from trtvae.metrics import compare
from trtvae.runtime.tiling_options import TilingNotice

EXACT_FP32 = 1e-5  # rel L2 to the untiled run
FP16_DB = 3.0  # exact fp16 may be at most this much further from fp32 than untiled fp16 is


def _sdxl_layout():
    """SDXL's VAE layout (4 levels, 2 resnets per down block, 3 per up block, mid-block attention), channels / 8."""
    config = family_config("sdxl")
    config.update(block_out_channels=[c // 8 for c in config["block_out_channels"]], norm_num_groups=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return AutoencoderKL.from_config(config).eval().requires_grad_(False)


def _export(tmp_path_factory, name, model, precision, **kw):
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    src = tmp_path_factory.mktemp(f"{name}_model")
    model.save_pretrained(src)
    out = tmp_path_factory.mktemp(f"{name}_{precision}")
    run_export(ExportOptions(model=str(src), precision=precision, out=out, verify=False, **kw))
    return out


@pytest.fixture(scope="module")
def sdxl_model():
    return _sdxl_layout()


@pytest.fixture(scope="module")
def sdxl_exports(tmp_path_factory, sdxl_model):
    return {p: _export(tmp_path_factory, "sdxl", sdxl_model, p) for p in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return AutoencoderKL.from_pretrained(tiny_dir).eval().requires_grad_(False)


class Counting(OrtVae):
    """OrtVae recording the input shape of every segment graph it runs."""

    def _run_segment(self, component, step, inputs):
        self.__dict__.setdefault("segment_calls", []).append((component, step.index, tuple(inputs["x"].shape)))
        return super()._run_segment(component, step, inputs)


def _tiles_of_first_tiled_step(vae, component):
    steps = vae._segment_steps(component)
    first = next(s.index for s in steps if s.kind == "tiled")
    return sum(1 for c, i, _ in vae.segment_calls if c == component and i == first)


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# (latent h, w, latent tile) → tiles; (image h, w, image tile) for the encoder; factor 2 (tiny) or 8 (SDXL).
DECODE_CASES = {"2x2": (28, 25, 16, 4), "3x2": (37, 25, 16, 6), "1xN": (13, 45, 14, 4)}
ENCODE_CASES = {"tiny": {"2x2": (56, 50, 32, 4), "3x2": (90, 50, 32, 6), "1xN": (26, 94, 28, 4)},
                "sdxl": {"2x2": (120, 104, 64, 4), "3x2": (184, 104, 64, 6), "1xN": (56, 200, 64, 4)}}


def _models(request, which):
    if which == "tiny":
        return {"fp32": request.getfixturevalue("tiny_fp32"), "fp16": request.getfixturevalue("tiny_fp16")}, \
            request.getfixturevalue("tiny_model")
    return request.getfixturevalue("sdxl_exports"), request.getfixturevalue("sdxl_model")


def _decode_both(folder, z, tile):
    vae = Counting.from_pretrained(folder)
    whole = vae.decode(z).sample
    vae.tile_latent_min_size = tile
    vae.enable_tiling()
    assert vae.tiling_mode == "exact" and vae.exact_tiling_unavailable == ""
    return vae, vae.decode(z).sample, whole


def _encode_both(folder, x, tile):
    vae = Counting.from_pretrained(folder)
    whole = vae.encode(x).latent_dist.parameters
    vae.tile_sample_min_size = tile
    vae.enable_tiling()
    return vae, vae.encode(x).latent_dist.parameters, whole


def _check_fp16(exact16, whole16, reference):
    e, u = compare(exact16, reference), compare(whole16, reference)
    assert e.nonfinite == 0
    # Distances as dB: exact may not cost more than FP16_DB over the untiled fp16 graph's own error.
    assert 20 * math.log10(e.rel_l2 / u.rel_l2) <= FP16_DB, (e, u)


@pytest.mark.parametrize("which", ["tiny", "sdxl"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_exact_decode_equals_untiled(request, which, case):
    exports, model = _models(request, which)
    h, w, tile, tiles = DECODE_CASES[case]
    z = _rand((1, model.config.latent_channels, h, w), seed=3)
    vae, exact, whole = _decode_both(exports["fp32"], z, tile)
    assert _tiles_of_first_tiled_step(vae, "decoder") == tiles
    stats = compare(exact, whole)
    assert exact.shape == whole.shape and stats.nonfinite == 0 and stats.rel_l2 <= EXACT_FP32, stats
    with torch.no_grad():
        reference = model.decode(z).sample
    assert compare(exact, reference).rel_l2 <= 1e-4  # and equals diffusers' untiled decode
    _, exact16, whole16 = _decode_both(exports["fp16"], z, tile)
    _check_fp16(exact16, whole16, reference)


@pytest.mark.parametrize("which", ["tiny", "sdxl"])
@pytest.mark.parametrize("case", ["2x2", "3x2", "1xN"])
def test_exact_encode_equals_untiled(request, which, case):
    exports, model = _models(request, which)
    h, w, tile, tiles = ENCODE_CASES[which][case]
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(4)) * 2 - 1
    vae, exact, whole = _encode_both(exports["fp32"], x, tile)
    assert _tiles_of_first_tiled_step(vae, "encoder") == tiles
    stats = compare(exact, whole)
    assert exact.shape == whole.shape and stats.nonfinite == 0 and stats.rel_l2 <= EXACT_FP32, stats
    with torch.no_grad():
        reference = model.encode(x).latent_dist.parameters
    _, exact16, whole16 = _encode_both(exports["fp16"], x, tile)
    _check_fp16(exact16, whole16, reference)


def test_batch_slicing_and_exact_tiling_together(tiny_fp32, tiny_model):
    z = _rand((3, 4, 28, 25), seed=5)
    vae = OrtVae.from_pretrained(tiny_fp32)
    vae.tile_latent_min_size = 12
    vae.enable_tiling()
    batched = vae.decode(z).sample
    vae.enable_slicing()
    sliced = vae.decode(z).sample
    with torch.no_grad():
        reference = torch.cat([tiny_model.decode(one).sample for one in z.split(1)])
    for ours in (batched, sliced):
        stats = compare(ours, reference)
        assert stats.nonfinite == 0 and stats.rel_l2 <= EXACT_FP32, stats
    # Each image is normalized with its own statistics: image 1 alone decodes as inside the batch.
    assert compare(vae.decode(z[1:2]).sample, batched[1:2]).rel_l2 <= EXACT_FP32


def test_blend_mode_still_equals_diffusers_tiled_decode(tiny_fp32, tiny_model):
    z = _rand((1, 4, 28, 25), seed=6)
    vae = OrtVae.from_pretrained(tiny_fp32)
    ref = AutoencoderKL.from_config(tiny_model.config)
    ref.load_state_dict(tiny_model.state_dict())
    ref.eval()
    for m in (vae, ref):
        m.tile_sample_min_size, m.tile_latent_min_size = 32, 16
    vae.enable_tiling(mode="blend")
    ref.enable_tiling()
    assert vae.tiling_mode == "blend"
    with torch.no_grad():
        theirs = ref.decode(z).sample
        untiled = tiny_model.decode(z).sample
    ours = vae.decode(z).sample
    assert compare(ours, theirs).rel_l2 <= 1e-4
    assert compare(ours, untiled).rel_l2 > 1e-3  # the blend is visibly not the untiled decode


def test_oversized_input_is_tiled_exactly_with_one_line(tiny_fp32, tiny_model):
    class Limited(OrtVae):
        def _spatial_limits(self, component):
            return ((1, 1), (12, 12)) if component == "decoder" else None

    vae = Limited.from_pretrained(tiny_fp32)
    z = _rand((1, 4, 28, 25), seed=7)
    with pytest.warns(TilingNotice, match="tiling it exactly"):
        ours = vae.decode(z).sample
    with warnings.catch_warnings():
        warnings.simplefilter("error", TilingNotice)
        vae.decode(z)  # once
    with torch.no_grad():
        assert compare(ours, tiny_model.decode(z).sample).rel_l2 <= EXACT_FP32


def test_changed_segment_file_is_refused(tiny_fp32, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_fp32, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    steps = manifest["components"]["decoder"]["segments"]["steps"]
    victim = copy / steps[2]["file"]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    vae = OrtVae.from_pretrained(copy)
    vae.tile_latent_min_size = 8
    vae.enable_tiling()
    with pytest.raises(ManifestError, match=f"{steps[2]['file']}.*sha256"):
        vae.decode(_rand((1, 4, 20, 20), seed=8))
    # Listed in the manifest with what a C++ consumer needs.
    for step in steps:
        assert {"file", "sha256", "halo", "upscale", "downscale", "inputs", "outputs", "norm"} <= set(step)


def test_export_without_segments_falls_back_to_blend_with_one_notice(tmp_path_factory):
    out = _export(tmp_path_factory, "noseg", make_tiny_vae(), "fp32", components=("decoder",), segments=False)
    assert "segments" not in json.loads((out / "manifest.json").read_text())["components"]["decoder"]
    vae = OrtVae.from_pretrained(out)
    assert "no decoder segment graphs" in vae.exact_tiling_unavailable
    with pytest.warns(TilingNotice, match="--no-segments"):
        vae.enable_tiling()
    assert vae.tiling_mode == "blend"
    with pytest.raises(ValueError, match="no decoder segment graphs"):
        vae.enable_tiling(mode="exact")
    with pytest.raises(ValueError, match="expected one of exact, blend"):
        vae.enable_tiling(mode="seamless")


def test_attention_in_query_row_chunks_equals_untiled(tiny_fp32, tiny_model):
    z = _rand((2, 4, 21, 17), seed=9)
    vae = Counting.from_pretrained(tiny_fp32)
    vae.attention_chunk_bytes = 1  # one query row per chunk
    vae.tile_latent_min_size = 8
    vae.enable_tiling()
    ours = vae.decode(z).sample
    rows = next(s.index for s in vae._segment_steps("decoder") if s.kind == "attention")
    assert sum(1 for _, i, _ in vae.segment_calls if i == rows) == 21
    with torch.no_grad():
        assert compare(ours, tiny_model.decode(z).sample).rel_l2 <= EXACT_FP32
