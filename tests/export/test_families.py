"""Every AutoencoderKL family from every source: built-in configs, single files in any key names, folders, demo."""
from __future__ import annotations

import json

import pytest
import torch
from family_models import FILE_ARCH, contract, family_vae, ldm_state
from safetensors.torch import save_file

from trtvae.cli import main
from trtvae.errors import ModelLoadError, OptionError
from trtvae.export import families
from trtvae.export.loading import load_demo, load_vae, peek_config

PUBLISHED = {  # the published vae/config.json values the families must carry
    "sd15": (4, 0.18215, None, True),
    "sdxl": (4, 0.13025, None, True),
    "sd3": (16, 1.5305, 0.0609, False),
    "flux": (16, 0.3611, 0.1159, False),
}


@pytest.mark.parametrize("family", families.NAMES)
def test_builtin_configs_carry_the_published_latent_space(family):
    channels, scale, shift, quant = PUBLISHED[family]
    c = families.family_config(family)
    assert (c["latent_channels"], c["scaling_factor"], c.get("shift_factor"), c.get("use_quant_conv", True)) == \
        (channels, scale, shift, quant)
    assert c["block_out_channels"] == [128, 256, 512, 512] and c["norm_num_groups"] == 32
    assert families.identify(c) == family
    assert peek_config("demo", family=family) == c
    # sdxl's is the fp16-fix (the default model); the others declare fp16 unsafe as published.
    assert c["force_upcast"] is (family != "sdxl")


def test_readme_family_table_agrees_with_the_family_table():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("## Model families")[1].split("| `--family` | VAE of")[1].split("\n\n")[0]
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| `")}
    for name, family in families.FAMILIES.items():
        c = families.family_config(name)
        _, channels, quant, scale, shift, _, safe = rows[name][:7]
        assert (int(channels), float(scale), float(shift) if shift else None) == \
            (c["latent_channels"], c["scaling_factor"], c.get("shift_factor"))
        assert quant == ("yes" if c.get("use_quant_conv", True) else "no")
        assert safe.startswith("no") is not family.fp16_safe_as_shipped


def test_demo_in_the_flux_architecture():
    loaded = load_demo(family="flux")
    assert loaded.name == "demo-flux" and loaded.family == "flux" and loaded.source["force_upcast"] is True
    assert loaded.vae.quant_conv is None and loaded.vae.post_quant_conv is None
    assert loaded.vae.decoder.conv_in.in_channels == 16 and loaded.vae.config.shift_factor == 0.1159


def _write(tmp_path, name, state):
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return path


# (family, key names, prefix): SD/A1111 checkpoints, ComfyUI saves, BFL's ae.safetensors, diffusers files.
FILES = [
    ("sd15", "ldm", "first_stage_model."),
    ("sdxl", "diffusers", ""),
    ("sd3", "ldm", "first_stage_model."),
    ("flux", "ldm", ""),
    ("flux", "ldm", "vae."),
]


@pytest.mark.parametrize("family,names,prefix", FILES)
def test_single_file_architecture_is_read_from_its_tensors(family, names, prefix, tmp_path):
    vae = family_vae(family, **FILE_ARCH)
    state = ldm_state(vae, prefix) if names == "ldm" else {prefix + k: v for k, v in vae.state_dict().items()}
    if prefix:
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4)  # the rest of a checkpoint
    loaded = load_vae(str(_write(tmp_path, family, state)), family=family)
    assert loaded.family == family and loaded.source["key_names"] == names
    for key, value in contract(family).items():
        if key != "force_upcast":
            assert loaded.vae.config[key] == value, key
    assert list(loaded.vae.config.block_out_channels) == [32, 32] and loaded.vae.config.layers_per_block == 1
    assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_a_4_channel_file_without_family_is_sdxl_and_says_so(tmp_path, capsys):
    path = _write(tmp_path, "vae", ldm_state(family_vae("sd15", **FILE_ARCH), "first_stage_model."))
    loaded = load_vae(str(path))
    out = capsys.readouterr().out
    assert loaded.family == "sdxl" and loaded.vae.config.scaling_factor == 0.13025
    assert "taking --family sdxl" in out and "--family sd15 or sdxl" in out
    assert "norm_num_groups=32" in out  # the architecture differs from the published one: said, not hidden
    given = load_vae(str(path), family="sd15")
    assert given.vae.config.scaling_factor == 0.18215
    # The assumption travels with the export: attach() and serve warn with it.
    from trtvae.swap import assumed_family_note

    assert loaded.source["family_assumed"] is True and given.source["family_assumed"] is False
    note = assumed_family_note({"source": loaded.source, "vae_config": {"scaling_factor": 0.13025}})
    assert "'sdxl' (scaling_factor 0.13025) was assumed" in note and "--family sd15" in note
    assert assumed_family_note({"source": given.source}) is None


def test_a_16_channel_file_without_family_lists_the_choices(tmp_path):
    path = _write(tmp_path, "ae", ldm_state(family_vae("flux", **FILE_ARCH)))
    with pytest.raises(ModelLoadError, match=r"16 latent channels.*--family sd3 or flux.*0\.3611"):
        load_vae(str(path))


def test_a_file_of_the_wrong_family_names_both_channel_counts(tmp_path):
    path = _write(tmp_path, "ae", ldm_state(family_vae("flux", **FILE_ARCH)))
    with pytest.raises(ModelLoadError, match=r"16 latent channels.*--family sdxl has 4; it can be sd3 or flux"):
        load_vae(str(path), family="sdxl")


def test_tensors_that_fit_no_family_are_named(tmp_path):
    good = ldm_state(family_vae("sd3", **FILE_ARCH))
    extra = {**good, "encoder.mid.attn_2.q.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(ModelLoadError, match=r"tensor encoder\.mid\.attn_2\.q\.weight \[32, 32, 1, 1\] fits no"):
        load_vae(str(_write(tmp_path, "extra", extra)), family="sd3")
    wrong = {**good, "decoder.up.0.block.0.conv2.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(ModelLoadError, match=r"decoder\.up\.0\.block\.0\.conv2\.weight has shape \[32, 32, 1, 1\], "
                                             r"expected \[32, 32, 3, 3\]"):
        load_vae(str(_write(tmp_path, "wrong", wrong)), family="sd3")
    missing = {k: v for k, v in good.items() if k != "decoder.norm_out.bias"}
    with pytest.raises(ModelLoadError, match=r"tensor decoder\.norm_out\.bias is missing"):
        load_vae(str(_write(tmp_path, "missing", missing)), family="sd3")
    eight = ldm_state(family_vae("sd3", **FILE_ARCH, latent_channels=8))
    with pytest.raises(ModelLoadError, match=r"decoder\.conv_in\.weight has 8 latent channels.*4 \(sd15\)"):
        load_vae(str(_write(tmp_path, "eight", eight)))
    with pytest.raises(ModelLoadError, match="no VAE tensors found"):
        load_vae(str(_write(tmp_path, "unet", {"model.diffusion_model.out.weight": torch.zeros(2)})))


def test_a_folder_config_wins_and_a_mismatch_names_both_values(tmp_path):
    family_vae("flux").save_pretrained(tmp_path / "flux")
    assert load_vae(str(tmp_path / "flux")).family == "flux"  # identified from its own config
    assert load_vae(str(tmp_path / "flux"), family="flux").vae.config.shift_factor == 0.1159
    with pytest.raises(ModelLoadError, match=r"scaling_factor=0\.3611, but --family sd3 has scaling_factor=1\.5305"
                                             r".*that of --family flux"):
        load_vae(str(tmp_path / "flux"), family="sd3")
    with pytest.raises(ModelLoadError, match=r"latent_channels=16, but --family sd15 has latent_channels=4"):
        load_vae(str(tmp_path / "flux"), family="sd15")


def test_a_folder_of_a_custom_vae_has_no_family(tiny_dir):
    loaded = load_vae(str(tiny_dir))
    assert loaded.family is None and loaded.source["force_upcast"] is True  # diffusers' default, as pipelines read it


def test_family_option_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "demo", "--family", "sd2"])
    assert e.value.code == 2 and "invalid choice: 'sd2'" in capsys.readouterr().err
    with pytest.raises(OptionError, match="--family 'sd2': expected one of sd15, sdxl, sd3, flux"):
        load_vae("demo", family="sd2")


def test_export_manifest_records_the_family_and_its_factors(tmp_path):
    family_vae("sd3").save_pretrained(tmp_path / "sd3")
    assert main(["--model", str(tmp_path / "sd3"), "--precision", "fp32", "--out", str(tmp_path / "out"),
                 "--engines", "skip", "--components", "decoder"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["family"] == manifest["source"]["family"] == "sd3"
    assert manifest["vae_config"]["shift_factor"] == 0.0609 and manifest["vae_config"]["scaling_factor"] == 1.5305
    # The graphs have one precision: nothing for a pipeline to upcast; what the source declared is kept.
    assert manifest["vae_config"]["force_upcast"] is False and manifest["source"]["force_upcast"] is True
    assert manifest["export_options"]["family"] is None


def test_rebuild_command_keeps_the_family_of_a_file():
    from trtvae.runtime.engine_check import rebuild_command

    manifest = {"family": "sd15", "source": {"kind": "file", "model": "/m/vae.safetensors", "family": "sd15"},
                "export_options": {"model": "vae.safetensors", "family": None, "precision": "fp16"}}
    assert "--family sd15" in rebuild_command(manifest, "out")
    folder = {"family": "flux", "source": {"kind": "folder", "model": "/m/flux"}, "export_options": {"family": None}}
    assert "--family" not in rebuild_command(folder, "out")  # its own config says it


def test_tensors_training_leaves_behind_are_ignored_with_a_note(tmp_path, capsys):
    """A1111 checkpoints carry loss.* and model_ema.*; diffusers' converter and A1111 skip them, so do we."""
    vae = family_vae("sd15", **FILE_ARCH)
    extra = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1),
             "loss.logvar": torch.zeros(())}
    path = _write(tmp_path, "a1111.safetensors", {**ldm_state(vae), **extra})
    loaded = load_vae(str(path), family="sd15")
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded.vae.state_dict().items())
    assert "ignoring 3 tensors that training leaves behind (loss.*, model_ema.*)" in capsys.readouterr().out


def test_legacy_diffusers_attention_names_load(tmp_path):
    """diffusers files from before 0.14 (query/key/value/proj_attn) load as from_pretrained converts them."""
    vae = family_vae("sd15", **FILE_ARCH)
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in vae.state_dict().items()}
    assert any(".query." in k for k in legacy)
    loaded = load_vae(str(_write(tmp_path, "old.safetensors", legacy)), family="sd15")
    assert loaded.vae.config.mid_block_add_attention
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded.vae.state_dict().items())


def test_a_conv_stored_flat_is_named_not_loaded(tmp_path):
    state = ldm_state(family_vae("sd15", **FILE_ARCH))
    key = "encoder.down.0.block.0.conv1.weight"
    state[key] = state[key][:, :, 0, 0].contiguous()
    with pytest.raises(ModelLoadError, match=rf"tensor {key} has shape \[\d+, \d+\], expected \[\d+, \d+, 3, 3\]"):
        load_vae(str(_write(tmp_path, "flat.safetensors", state)), family="sd15")
