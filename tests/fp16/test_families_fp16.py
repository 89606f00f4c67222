"""fp16 on every family: a planted overflow in the FLUX.1 architecture (16 channels, no quant convs),
force_upcast declared by the source, shifted calibration latents, and the user's own calibration images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from family_models import family_vae
from PIL import Image
from planting import plant_overflow

from trtvae.cli import main
from trtvae.errors import OptionError, VerificationError
from trtvae.export.fp16.audit import audit_model
from trtvae.export.fp16.calibration import calibration_inputs, random_latents
from trtvae.export.options import ExportOptions
from trtvae.export.run import run_export
from trtvae.manifest import MANIFEST_NAME
from trtvae.metrics import REL_L2_THRESHOLD

PLANT_LOWEST = 16  # as in test_fp16_safety: the tiny model's planted streams reach 3e5-5e5


@pytest.fixture(scope="module")
def flux():
    return family_vae("flux")


@pytest.fixture(scope="module")
def planted(flux):
    return plant_overflow(flux, PLANT_LOWEST)


@pytest.fixture(scope="module")
def planted_flux_dir(planted, tmp_path_factory):
    # Saved without the scaled eps (no tensor): fp32 differs by ~1e-6, fp16 overflows all the same.
    path = tmp_path_factory.mktemp("planted_flux")
    planted.save_pretrained(path)
    return path


def _export(model, out, **kw):
    return run_export(ExportOptions(model=str(model), precision="fp16", out=out, engines="skip", **kw))


def test_planting_in_the_flux_architecture_keeps_fp32_and_overflows_fp16(flux, planted):
    assert planted.quant_conv is None and planted.post_quant_conv is None and planted.config.latent_channels == 16
    z = random_latents(flux.config, [(8, 8)])[0][1]
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(planted.decode(z).sample, flux.decode(z).sample)
        assert torch.equal(planted.encode(x).latent_dist.mean, flux.encode(x).latent_dist.mean)
    before, after = audit_model(flux), audit_model(planted)
    assert before.fp16_safe and not after.fp16_safe and after.rescale_possible
    assert after.declares_force_upcast and after.worst.max_abs > 65504


def test_flux_overflow_is_not_hidden_by_verify(planted_flux_dir, tmp_path, capsys):
    out = tmp_path / "no_rescale"
    with pytest.raises(VerificationError, match=r"NaN/inf"):
        _export(planted_flux_dir, out, rescale=False, components=("decoder",))
    printed = " ".join(capsys.readouterr().out.split())
    assert "fp16 UNSAFE" in printed and "declares force_upcast: true" in printed
    assert not (out / MANIFEST_NAME).exists()


def test_a_passing_verify_never_hides_an_overflow_the_audit_measured(planted_flux_dir, tmp_path, monkeypatch):
    # ONNX Runtime's CPU kernels run parts of an fp16 graph in fp32: the full-size planted FLUX VAE (max 1.4e5)
    # passed its verify with --no-rescale. Stand in a verify that sees nothing, as that one did.
    import trtvae.export.run as run

    monkeypatch.setattr(run, "verify_export", lambda *a, **k: {"status": "passed", "checks": []})
    out = tmp_path / "no_rescale"
    with pytest.raises(VerificationError, match=r"verify passed, but the audit measured \|activation\| .* > 65504 .*"
                                                r"declares force_upcast: true.*TensorRT"):
        _export(planted_flux_dir, out, rescale=False, components=("decoder",))
    assert not (out / MANIFEST_NAME).exists()


def test_flux_overflow_is_rescaled_to_a_finite_accurate_fp16_export(planted_flux_dir, tmp_path):
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "own.png", 40, 24, 2)
    out = _export(planted_flux_dir, tmp_path / "rescaled", family="flux", images=tmp_path / "images")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    calibration = json.loads((out / "fp16_audit.json").read_text())["calibration"]
    assert {"image own.png 24x40", "latents of image own.png 24x40"} <= {c["label"] for c in calibration}
    safety = manifest["fp16_safety"]
    assert safety["audit"]["declares_force_upcast"] is True and not safety["audit"]["fp16_safe"]
    assert safety["rescale"]["applied"] and safety["audit_after_rescale"]["fp16_safe"]
    checks = manifest["verify"]["checks"]
    assert manifest["verify"]["passed"] and {c["component"] for c in checks} == {"decoder", "encoder"}
    assert all(c["nonfinite"] == 0 and c["rel_l2"] <= REL_L2_THRESHOLD["fp16"] for c in checks)
    assert manifest["family"] == "flux" and manifest["vae_config"]["shift_factor"] == 0.1159


def test_text_to_image_calibration_latents_carry_the_shift(flux):
    config = dict(flux.config)
    shifted = random_latents(config, [(4, 6)])[0][1]
    plain = random_latents({**config, "shift_factor": None}, [(4, 6)])[0][1]
    assert torch.allclose(shifted - plain, torch.full_like(plain, 0.1159))


def _png(path, w, h, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_user_images_join_the_calibration(flux, tmp_path):
    _png(tmp_path / "photo.png", 301, 203, 0)  # shrunk to 256×172, cropped to the factor: 256×172
    Image.fromarray(np.full((33, 47, 3), 200, np.uint8)).save(tmp_path / "scan.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    builtin = calibration_inputs(flux, ("decoder", "encoder"))
    ours = calibration_inputs(flux, ("decoder", "encoder"), image_dir=tmp_path)
    added = ours["encoder"][len(builtin["encoder"]):]
    assert [label.split()[1] for label, _ in added] == ["photo.png", "scan.JPG"]
    assert [tuple(x.shape) for _, x in added] == [(1, 3, 172, 256), (1, 3, 32, 46)]
    assert all(float(x.min()) >= -1 and float(x.max()) <= 1 for _, x in added)
    assert len(ours["decoder"]) == len(builtin["decoder"]) + 2  # their latents are decoded too


def test_images_option_errors(tmp_path, tiny_dir, capsys):
    with pytest.raises(OptionError, match="no such folder"):
        ExportOptions(model="demo", images=tmp_path / "missing").check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionError, match=r"no \.png/\.jpg/\.jpeg images"):
        ExportOptions(model="demo", images=tmp_path / "empty").check()
    _png(tmp_path / "a.png", 16, 16, 0)
    with pytest.raises(OptionError, match="--images calibrates the fp16 audit; --precision is fp32"):
        ExportOptions(model="demo", precision="fp32", images=tmp_path).check()
    assert main(["audit", "--model", str(tiny_dir), "--images", str(tmp_path / "empty")]) == 1
    assert "error: --images" in capsys.readouterr().err


def test_cli_audit_with_images(tiny_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png", 40, 24, 1)
    path = tmp_path / "audit.json"
    assert main(["audit", "--model", str(tiny_dir), "--images", str(images), "--json", str(path)]) == 0
    labels = [c["label"] for c in json.loads(path.read_text())["calibration"]]
    assert "image a.png 24x40" in labels and "latents of image a.png 24x40" in labels
