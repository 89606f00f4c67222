"""The runtime contract for TRTVae, on engines built from the tiny export. Needs TensorRT and a CUDA GPU."""
from __future__ import annotations

import pytest
from conftest import HAS_TRT
from contract import RuntimeContract

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu,
              pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")]


class TestTRTVaeFp16(RuntimeContract):
    @pytest.fixture(scope="class")
    def runtime(self, tmp_path_factory, tiny_dir):
        from trtvae import TRTVae
        from trtvae.export.options import ExportOptions
        from trtvae.export.run import run_export

        out = run_export(ExportOptions(model=str(tiny_dir), precision="fp16", out=tmp_path_factory.mktemp("trt"),
                                       engines="required", batch="1-4", resolution="16-128", opt=32))
        return TRTVae.from_pretrained(out)

    @pytest.fixture
    def reference(self, tiny_ref):
        return tiny_ref

    @pytest.fixture
    def precision(self):
        return "fp16"

    def test_exact_tiling_on_segment_plans_matches_the_untiled_model(self, runtime, reference):
        import torch

        from trtvae import TRTVae
        from trtvae.metrics import compare, passes

        z = torch.randn(2, 4, 28, 25, generator=torch.Generator().manual_seed(21))
        x = torch.rand(1, 3, 56, 50, generator=torch.Generator().manual_seed(22)) * 2 - 1
        with torch.no_grad():
            dec, enc = reference.decode(z).sample, reference.encode(x).latent_dist.mean
        for vae in (runtime, TRTVae.from_pretrained(runtime.directory, exact_boundaries="host")):
            vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 16
            vae.enable_tiling()
            try:
                assert vae.tiling_mode == "exact"
                assert passes(compare(vae.decode(z.cuda()).sample.cpu(), dec), "fp16")
                assert passes(compare(vae.encode(x.cuda()).latent_dist.mean.cpu(), enc), "fp16")
            finally:
                vae.disable_tiling()
