"""OrtVae behaves as diffusers' AutoencoderKL: the shared runtime contract, plus what is OrtVae's own."""
from __future__ import annotations

import pytest
import torch
from contract import RuntimeContract

from trtvae import OrtVae
from trtvae.manifest import ManifestError
from trtvae.metrics import compare


class TestOrtVaeFp32(RuntimeContract):
    @pytest.fixture(scope="class")
    def runtime(self, tiny_fp32):
        return OrtVae.from_pretrained(tiny_fp32)

    @pytest.fixture
    def reference(self, tiny_ref):
        return tiny_ref

    @pytest.fixture
    def precision(self):
        return "fp32"


class TestOrtVaeFp16(TestOrtVaeFp32):
    @pytest.fixture(scope="class")
    def runtime(self, tiny_fp16):
        return OrtVae.from_pretrained(tiny_fp16)

    @pytest.fixture
    def precision(self):
        return "fp16"


@pytest.fixture(scope="module")
def vae32(tiny_fp32):
    return OrtVae.from_pretrained(tiny_fp32)


@pytest.fixture(scope="module")
def vae16(tiny_fp16):
    return OrtVae.from_pretrained(tiny_fp16)


def _latents(b=2, h=6, w=10, seed=0):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _images(b=2, h=12, w=20, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_latent_dist_sampling_follows_the_generator_as_diffusers(vae32, tiny_ref):
    x = _images(b=1)
    ours = vae32.encode(x).latent_dist
    with torch.no_grad():
        theirs = tiny_ref.encode(x).latent_dist
    a = ours.sample(torch.Generator().manual_seed(7))
    b = theirs.sample(torch.Generator().manual_seed(7))
    assert compare(a, b).rel_l2 <= 1e-4
    c = ours.sample(torch.Generator().manual_seed(8))
    assert not torch.allclose(a, c)
    assert torch.isfinite(ours.kl()).all() and ours.kl().shape == (1,)


def test_any_float_dtype_is_cast(vae16):
    z = _latents(b=1)
    out64 = vae16.decode(z.double()).sample
    out32 = vae16.decode(z).sample
    assert out64.dtype == torch.float16
    assert torch.equal(out64, out32)


def test_config_is_diffusers_style(vae16, tiny_fp16):
    cfg = vae16.config
    assert cfg.scaling_factor == 0.5 and cfg["scaling_factor"] == 0.5
    assert cfg.force_upcast is False and cfg["force_upcast"] is False
    assert list(cfg.block_out_channels) == [32, 64]
    assert cfg.latent_channels == 4
    assert "shift_factor" in cfg and "latents_mean" in cfg
    assert vae16.dtype == torch.float16
    assert vae16.device == torch.device("cpu")
    assert vae16.to("cpu") is vae16 and vae16.to(torch.float16) is vae16
    with pytest.warns(UserWarning, match=r"to\(torch.float32\) is ignored: this export runs in torch.float16"):
        assert vae16.to(dtype=torch.float32) is vae16


def test_value_beyond_fp16_range_is_reported_after_the_cast(vae16):
    # Finite in fp32 but beyond fp16's range: caught after the cast to the model's dtype.
    with pytest.raises(ValueError, match="NaN or inf"):
        vae16.decode(_latents(b=1) * 1e6)


def test_loading_checks_files_against_manifest(tmp_path, tiny_fp32):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_fp32, copy)
    with pytest.raises(ManifestError, match="not a finished trtvae export"):
        OrtVae.from_pretrained(tmp_path)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "decoder.onnx").write_bytes(bytes(data))
    vae = OrtVae.from_pretrained(copy)
    with pytest.raises(ManifestError, match="does not match the manifest"):
        vae.decode(_latents(b=1))
    # The encoder was not touched and still runs.
    assert vae.encode(_images(b=1)).latent_dist.mean.shape == (1, 4, 6, 10)


def test_unsupported_schema_version(tmp_path, tiny_fp32):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_fp32, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="schema_version 99"):
        OrtVae.from_pretrained(copy)


def test_runtime_does_not_import_export(tiny_fp32):
    """A deployment ships trtvae.runtime alone: loading and running an export never imports the exporter."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from trtvae import OrtVae\n"
        f"vae = OrtVae.from_pretrained({str(tiny_fp32)!r})\n"
        "vae.decode(torch.randn(1, 4, 4, 4)); vae.encode(torch.rand(1, 3, 8, 8))\n"
        "import trtvae.runtime.trt, trtvae.runtime.tiling_options\n"
        "print(sorted(m for m in sys.modules if m.startswith('trtvae.export')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
