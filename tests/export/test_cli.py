"""`vae-export` end to end, including the full SDXL-architecture demo model."""
from __future__ import annotations

import pytest
import torch

from trtvae import OrtVae
from trtvae.cli import main
from trtvae.manifest import read_manifest


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_demo_export_verifies_and_runs(tmp_path, capsys, precision):
    """The README's main job, on the full SDXL-architecture demo, in both precisions it names."""
    out = tmp_path / "demo"
    assert main(["--model", "demo", "--precision", precision, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Accuracy vs PyTorch fp32" in text and "FAIL" not in text
    m = read_manifest(out)
    assert m["verify"]["status"] == "passed" and m["precision"] == precision
    assert len(m["verify"]["checks"]) == 9
    assert m["spatial_factor"] == 8 and m["source"]["kind"] == "demo"
    vae = OrtVae.from_pretrained(out)
    image = vae.decode(torch.randn(1, 4, 5, 6)).sample
    assert image.shape == (1, 3, 40, 48) and torch.isfinite(image).all()


def test_cli_rejects_bad_options_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "demo", "--precision", "int8"])
    assert e.value.code == 2
    assert main(["--model", "demo", "--components", "decoder,unet", "--out", str(tmp_path / "x")]) == 1
    assert "--components" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_tiny_fp32_no_verify(tmp_path, tiny_dir):
    out = tmp_path / "o"
    assert main(["--model", str(tiny_dir), "--precision", "fp32", "--out", str(out), "--no-verify"]) == 0
    assert read_manifest(out)["verify"] == {"status": "skipped"}
