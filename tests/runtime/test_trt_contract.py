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
