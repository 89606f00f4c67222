"""OrtVae behaves as diffusers' AutoencoderKL: outputs, distributions, config, errors on bad input."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from trtvae import OrtVae
from trtvae.manifest import ManifestError
from trtvae.metrics import REL_L2_THRESHOLD, compare


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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_decode_matches_diffusers(request, tiny_ref, precision):
    vae = request.getfixturevalue(f"vae{precision[2:]}")
    z = _latents()
    out = vae.decode(z)
    assert isinstance(out, DecoderOutput)
    with torch.no_grad():
        ref = tiny_ref.decode(z).sample
    stats = compare(out.sample, ref, image=True)
    assert stats.nonfinite == 0 and stats.rel_l2 <= REL_L2_THRESHOLD[precision], stats
    assert out.sample.shape == (2, 3, 12, 20)
    assert out.sample.dtype == vae.dtype


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_encode_matches_diffusers(request, tiny_ref, precision):
    vae = request.getfixturevalue(f"vae{precision[2:]}")
    x = _images()
    out = vae.encode(x)
    assert isinstance(out, AutoencoderKLOutput)
    dist = out.latent_dist
    assert isinstance(dist, DiagonalGaussianDistribution)
    with torch.no_grad():
        ref = tiny_ref.encode(x).latent_dist
    for ours, theirs in ((dist.mean, ref.mean), (dist.logvar, ref.logvar), (dist.mode(), ref.mode())):
        stats = compare(ours, theirs)
        assert stats.nonfinite == 0 and stats.rel_l2 <= REL_L2_THRESHOLD[precision], stats


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


def test_return_dict_false_gives_tuples(vae32):
    (sample,) = vae32.decode(_latents(b=1), return_dict=False)
    assert isinstance(sample, torch.Tensor) and sample.shape == (1, 3, 12, 20)
    (dist,) = vae32.encode(_images(b=1), return_dict=False)
    assert isinstance(dist, DiagonalGaussianDistribution)


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


BAD_INPUTS = [
    ("decode", "not a tensor", "expected a torch.Tensor"),
    ("decode", torch.zeros(4, 6, 10), r"got shape \(4, 6, 10\) \(3 dims\), expected \[batch, 4, h, w\]"),
    ("decode", torch.zeros(1, 3, 6, 10), r"'latent_sample'.*\(1, 3, 6, 10\) with 3 channels, expected \[batch, 4"),
    ("decode", torch.zeros(0, 4, 6, 10), "empty batch"),
    ("decode", torch.zeros(1, 4, 6, 10, dtype=torch.int64), "floating-point"),
    ("encode", torch.zeros(1, 3, 13, 20), r"'sample'.*\(1, 3, 13, 20\).*multiples of 2"),
    ("encode", torch.zeros(1, 4, 12, 20), r"with 4 channels, expected \[batch, 3, H, W\]"),
]


@pytest.mark.parametrize("method,x,message", BAD_INPUTS)
def test_bad_input_names_tensor_and_shapes(vae32, method, x, message):
    with pytest.raises(ValueError, match=message):
        getattr(vae32, method)(x)


def test_nonfinite_input_is_reported(vae32, vae16):
    z = _latents(b=1)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 240 values are NaN or inf"):
        vae32.decode(z)
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
        "import trtvae.runtime.trt, trtvae.runtime.tiling\n"
        "print(sorted(m for m in sys.modules if m.startswith('trtvae.export')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
