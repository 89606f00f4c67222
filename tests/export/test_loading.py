"""Model sources: demo, diffusers folder, single .safetensors file, Hub id offline, pickle refusal."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from trtvae.errors import ModelLoadError
from trtvae.export.families import family_config
from trtvae.export.loading import load_demo, load_vae
from trtvae.files import sha256_file


def test_demo_is_the_sdxl_architecture_and_deterministic():
    a = load_demo()
    assert sum(p.numel() for p in a.vae.parameters()) == 83_653_863
    assert list(a.vae.config.block_out_channels) == [128, 256, 512, 512]
    assert a.vae.config.scaling_factor == 0.13025
    assert a.family == "sdxl" and a.name == "demo" and a.source["force_upcast"] is False  # the fp16-fix's config
    assert a.source["weights_sha256"] == load_demo().source["weights_sha256"]
    assert a.source["weights_sha256"] != load_demo(seed=1).source["weights_sha256"]


def test_folder_and_pipeline_folder(tiny_dir, tmp_path):
    loaded = load_vae(str(tiny_dir))
    assert loaded.source["kind"] == "folder"
    assert loaded.vae.dtype == torch.float32
    pipeline_root = tmp_path / "pipe"
    (pipeline_root / "vae").mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (pipeline_root / "vae" / f.name).write_bytes(f.read_bytes())
    again = load_vae(str(pipeline_root))
    assert again.source["weights_sha256"] == loaded.source["weights_sha256"]


def test_single_safetensors_file_in_diffusers_keys(tmp_path):
    demo = load_demo().vae
    path = tmp_path / "my-sdxl-vae.safetensors"
    save_file({k: v.half().contiguous() for k, v in demo.state_dict().items()}, str(path))
    loaded = load_vae(str(path))
    assert loaded.name == "my-sdxl-vae"
    assert loaded.source == {"kind": "file", "model": str(path.resolve()), "family": "sdxl", "family_assumed": True,
                             "key_names": "diffusers", "force_upcast": False, "weights_sha256": sha256_file(path)}
    w = "decoder.conv_out.weight"
    assert torch.equal(loaded.vae.state_dict()[w], demo.state_dict()[w].half().float())


def test_single_file_of_another_architecture_is_read_from_its_tensors(tmp_path, tiny_dir, capsys):
    from safetensors.torch import load_file

    path = tmp_path / "tiny.safetensors"
    save_file(load_file(tiny_dir / "diffusion_pytorch_model.safetensors"), str(path))
    loaded = load_vae(str(path))
    assert list(loaded.vae.config.block_out_channels) == [32, 64]
    # Its norm_num_groups (8) is in no tensor: the family's 32 is used, and the output says so.
    assert "block_out_channels, layers_per_block differ from the published sdxl VAE's; norm_num_groups=32" in \
        " ".join(capsys.readouterr().out.split())


def test_pickle_checkpoints_are_refused(tmp_path, tiny_dir):
    ckpt = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ModelLoadError, match="pickle.*--allow-pickle"):
        load_vae(str(ckpt))
    folder = tmp_path / "binfolder"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save({}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_vae(str(folder))


def test_missing_path_is_reported():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vae("./no/such/vae.safetensors")


def test_sdxl_config_is_shipped():
    cfg = family_config("sdxl")
    assert cfg["force_upcast"] is False and cfg["latent_channels"] == 4


def test_hub_unreachable_gives_one_line_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "trtvae.cli", "--model", "someone/not-cached-vae", "--out", str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "someone/not-cached-vae" in errors[0] and "--model demo" in errors[0]
    assert "HF_HUB_OFFLINE" in errors[0]
    assert "Traceback" not in proc.stderr


def _to_ldm_keys(state: dict, n_up: int) -> dict:
    """diffusers → original (LDM) VAE key names, as in SD checkpoints and ComfyUI/A1111 VAE files."""
    import re

    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m.group(1)) + 1}", k)
        if "mid_block.attentions.0" in k:
            k = k.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
            k = re.sub(r"to_([qkv])\.", r"\1.", k).replace("to_out.0", "proj_out")
            if value.ndim == 2:  # LDM keeps attention projections as 1×1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def test_single_file_with_original_ldm_keys(tmp_path):
    demo = load_demo().vae
    state = {k: v.half().contiguous() for k, v in demo.state_dict().items()}
    path = tmp_path / "sdxl_vae.safetensors"
    save_file(_to_ldm_keys(state, n_up=4), str(path))
    loaded = load_vae(str(path)).vae.state_dict()
    assert loaded.keys() == state.keys()
    for k in ("decoder.up_blocks.0.resnets.0.conv1.weight", "encoder.mid_block.attentions.0.to_q.weight",
              "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"):
        assert torch.equal(loaded[k], state[k].float()), k


def test_a_folder_with_another_models_config_is_refused_in_one_line(tmp_path):
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "in_channels": 4}')
    with pytest.raises(ModelLoadError, match="describes a UNet2DConditionModel, expected AutoencoderKL"):
        run_export(ExportOptions(model=str(folder), out=tmp_path / "o"))
