"""The runtime API contract, written once (diffusers' AutoencoderTesterMixin habit).

A test class inherits `RuntimeContract` and provides three fixtures: `runtime` (a VaeRuntime on
the tiny export), `reference` (the tiny AutoencoderKL with the same weights) and `precision`.
Inputs are made on the runtime's device, so the same tests run OrtVae on the CPU and TRTVae on CUDA.
"""
from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from trtvae.metrics import REL_L2_THRESHOLD, compare


def latents(b=2, h=6, w=10, seed=0):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def images(b=2, h=12, w=20, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


BAD_INPUTS = [
    ("decode", "not a tensor", "expected a torch.Tensor"),
    ("decode", torch.zeros(4, 6, 10), r"got shape \(4, 6, 10\) \(3 dims\), expected \[batch, 4, h, w\]"),
    ("decode", torch.zeros(1, 3, 6, 10), r"'latent_sample'.*\(1, 3, 6, 10\) with 3 channels, expected \[batch, 4"),
    ("decode", torch.zeros(0, 4, 6, 10), "empty batch"),
    ("decode", torch.zeros(1, 4, 6, 10, dtype=torch.int64), "floating-point"),
    ("encode", torch.zeros(1, 3, 13, 20), r"'sample'.*\(1, 3, 13, 20\).*multiples of 2"),
    ("encode", torch.zeros(1, 4, 12, 20), r"with 4 channels, expected \[batch, 3, H, W\]"),
]


class RuntimeContract:
    def _on(self, runtime, x):
        return x.to(runtime.device) if isinstance(x, torch.Tensor) else x

    def _assert_close(self, ours, theirs, precision):
        stats = compare(ours, theirs, image=ours.shape[1] == 3)
        assert ours.shape == theirs.shape
        assert stats.nonfinite == 0 and stats.rel_l2 <= REL_L2_THRESHOLD[precision], stats

    def test_decode_matches_diffusers(self, runtime, reference, precision):
        z = latents()
        out = runtime.decode(self._on(runtime, z))
        assert isinstance(out, DecoderOutput)
        with torch.no_grad():
            ref = reference.decode(z).sample
        self._assert_close(out.sample, ref, precision)
        assert out.sample.shape == (2, 3, 12, 20)
        assert out.sample.dtype == runtime.dtype and out.sample.device.type == runtime.device.type

    def test_encode_matches_diffusers(self, runtime, reference, precision):
        x = images()
        out = runtime.encode(self._on(runtime, x))
        assert isinstance(out, AutoencoderKLOutput)
        dist = out.latent_dist
        assert isinstance(dist, DiagonalGaussianDistribution)
        with torch.no_grad():
            ref = reference.encode(x).latent_dist
        for ours, theirs in ((dist.mean, ref.mean), (dist.logvar, ref.logvar), (dist.mode(), ref.mode())):
            self._assert_close(ours, theirs, precision)

    def test_return_dict_false_gives_tuples(self, runtime):
        (sample,) = runtime.decode(self._on(runtime, latents(b=1)), return_dict=False)
        assert isinstance(sample, torch.Tensor) and sample.shape == (1, 3, 12, 20)
        (dist,) = runtime.encode(self._on(runtime, images(b=1)), return_dict=False)
        assert isinstance(dist, DiagonalGaussianDistribution)

    @pytest.mark.parametrize("method,x,message", BAD_INPUTS)
    def test_bad_input_names_tensor_and_shapes(self, runtime, method, x, message):
        with pytest.raises(ValueError, match=message):
            getattr(runtime, method)(self._on(runtime, x))

    def test_nonfinite_input_is_reported(self, runtime):
        z = latents(b=1)
        z[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="1 of 240 values are NaN or inf"):
            runtime.decode(self._on(runtime, z))

    def test_tiled_decode_and_encode_match_diffusers(self, runtime, reference, precision):
        z, x = latents(b=1, h=28, w=25), images(b=1, h=56, w=50)
        saved = runtime.tile_sample_min_size, runtime.tile_latent_min_size
        try:
            for m in (runtime, reference):
                m.tile_sample_min_size, m.tile_latent_min_size = 32, 16
            runtime.enable_tiling(mode="blend")  # diffusers' own tiling, result for result
            reference.enable_tiling()
            with torch.no_grad():
                dec, enc = reference.decode(z).sample, reference.encode(x).latent_dist.mean
            self._assert_close(runtime.decode(self._on(runtime, z)).sample, dec, precision)
            self._assert_close(runtime.encode(self._on(runtime, x)).latent_dist.mean, enc, precision)
        finally:
            for m in (runtime, reference):
                m.disable_tiling()
            runtime.tile_sample_min_size, runtime.tile_latent_min_size = saved
            reference.tile_sample_min_size, reference.tile_latent_min_size = 32, 16

    def test_slicing_changes_nothing(self, runtime):
        z = self._on(runtime, latents(b=3, h=10, w=6))
        whole = runtime.decode(z).sample
        runtime.enable_slicing()
        try:
            sliced = runtime.decode(z).sample
        finally:
            runtime.disable_slicing()
        assert compare(sliced, whole).rel_l2 <= 1e-6
