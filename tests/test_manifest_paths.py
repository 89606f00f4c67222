"""A manifest names files inside its own folder only: absolute paths, `..` and links out are refused (issue 11, #9)."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from trtvae.cli import main
from trtvae.manifest import ManifestError, component_file, read_manifest


def _copy(tmp_path, tiny_fp32):
    folder = tmp_path / "export"
    shutil.copytree(tiny_fp32, folder)
    return folder


def _set(folder, component, key, file):
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["components"][component]
    if isinstance(entry.get(key), dict):
        entry[key]["file"] = file
    else:
        entry[key] = file
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _plan_entry(folder, name="decoder.plan"):
    plan = b"not a real plan"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["components"]["decoder"]["engine"] = {
        "file": name, "sha256": hashlib.sha256(plan).hexdigest(),
        "profiles": [{"latent_sample": {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [1, 4, 8, 8]}}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return plan


@pytest.mark.parametrize("key", ["onnx", "engine"])
def test_paths_leaving_the_folder_are_refused_even_when_the_hash_matches(tmp_path, tiny_fp32, key):
    folder = _copy(tmp_path, tiny_fp32)
    outside = tmp_path / "other"
    outside.mkdir()
    if key == "engine":
        (outside / "decoder.plan").write_bytes(_plan_entry(folder))
        name = "decoder.plan"
    else:
        shutil.copy(folder / "decoder.onnx", outside / "decoder.onnx")  # same bytes: the sha256 matches
        name = "decoder.onnx"
    for bad in (f"../other/{name}", str(outside / name), f"sub/../../other/{name}", f"..\\other\\{name}"):
        manifest = _set(folder, "decoder", key, bad)
        with pytest.raises(ManifestError, match=f"component 'decoder' '{key}': file .* points outside .*"
                                                "expected a file name relative to the export folder"):
            component_file(folder, manifest, "decoder", key=key)
    # A link inside the folder that resolves outside it is refused as well.
    (folder / f"link-{name}").symlink_to(outside / name)
    manifest = _set(folder, "decoder", key, f"link-{name}")
    with pytest.raises(ManifestError, match=r"is a link to .*other.*, outside .*export"):
        component_file(folder, manifest, "decoder", key=key)
    # A link that stays inside is fine (its target is hash-checked as any file).
    if key == "onnx":
        (folder / "copy.onnx").symlink_to(folder / "decoder.onnx")
        manifest = _set(folder, "decoder", key, "copy.onnx")
        assert component_file(folder, manifest, "decoder", key=key) == folder / "copy.onnx"
    for bad in (None, "", 3):
        manifest = _set(folder, "decoder", key, bad)
        with pytest.raises(ManifestError, match="expected a file name relative to the export folder"):
            component_file(folder, manifest, "decoder", key=key)


def test_runtime_and_triton_refuse_an_outside_onnx(tmp_path, tiny_fp32, capsys):
    from trtvae import OrtVae

    folder = _copy(tmp_path, tiny_fp32)
    (tmp_path / "other").mkdir()
    shutil.copy(folder / "decoder.onnx", tmp_path / "other" / "decoder.onnx")
    _set(folder, "decoder", "onnx", "../other/decoder.onnx")
    vae = OrtVae.from_pretrained(folder)
    import torch

    with pytest.raises(ManifestError, match="points outside"):
        vae.decode(torch.zeros(1, 4, 8, 8))
    assert main(["triton", str(folder), "--repo", str(tmp_path / "repo"), "--backend", "onnx"]) == 1
    assert "points outside" in capsys.readouterr().err
    assert read_manifest(folder)["components"]["decoder"]["onnx"] == "../other/decoder.onnx"


def test_triton_refuses_an_outside_plan(tmp_path, tiny_fp32, capsys):
    folder = _copy(tmp_path, tiny_fp32)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "decoder.plan").write_bytes(_plan_entry(folder))
    _set(folder, "decoder", "engine", "../other/decoder.plan")
    assert main(["triton", str(folder), "--repo", str(tmp_path / "repo")]) == 1
    assert "points outside" in capsys.readouterr().err


def test_segment_plans_are_read_once_checked_and_kept_inside(tmp_path, tiny_fp32):
    from trtvae.manifest import referenced_files, segment_bytes, segment_plans

    folder = _copy(tmp_path, tiny_fp32)
    manifest = read_manifest(folder)
    assert segment_plans(manifest, "decoder") is None  # ONNX segment graphs only: exported without TensorRT
    steps = manifest["components"]["decoder"]["segments"]["steps"]
    plans = {}
    for i, step in enumerate(steps):
        plans[i] = f"plan {i}".encode()
        name = step["file"].replace(".onnx", ".plan")
        (folder / name).write_bytes(plans[i])
        step["engine"] = {"file": name, "sha256": hashlib.sha256(plans[i]).hexdigest()}
    assert [p["file"] for p in segment_plans(manifest, "decoder")] == [f"decoder.segment{i:02d}.plan"
                                                                       for i in range(len(steps))]
    assert segment_bytes(folder, manifest, "decoder", 3, key="engine") == plans[3]
    assert segment_bytes(folder, manifest, "decoder", 3) == (folder / steps[3]["file"]).read_bytes()
    # A re-export removes old plans as its own files, not as the user's.
    assert {"decoder.segment03.plan", "decoder.segment03.onnx"} <= referenced_files(manifest)

    (folder / "decoder.segment03.plan").write_bytes(b"plan 3 swapped")
    with pytest.raises(ManifestError, match=r"decoder.segment03.plan: sha256 .* does not match the manifest"):
        segment_bytes(folder, manifest, "decoder", 3, key="engine")
    (folder / "decoder.segment04.plan").unlink()
    with pytest.raises(ManifestError, match="decoder.segment04.plan is listed in the manifest but missing"):
        segment_bytes(folder, manifest, "decoder", 4, key="engine")
    (tmp_path / "other.plan").write_bytes(plans[5])  # same bytes, outside the folder
    steps[5]["engine"]["file"] = "../other.plan"
    with pytest.raises(ManifestError, match="component 'decoder' segment 5: file '../other.plan' points outside"):
        segment_bytes(folder, manifest, "decoder", 5, key="engine")
    with pytest.raises(ManifestError, match="manifest lists no segment 99 'engine' file for component 'decoder'"):
        segment_bytes(folder, manifest, "decoder", 99, key="engine")
    del steps[6]["engine"]
    assert segment_plans(manifest, "decoder") is None  # one step without a plan: no exact tiling on TensorRT
