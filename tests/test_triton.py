"""Triton model repository written from an export folder's manifest."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from trtvae.cli import main
from trtvae.errors import OptionError
from trtvae.files import sha256_file
from trtvae.triton import write_triton_repo


def test_onnx_repository(tmp_path, tiny_fp16):
    repo = tmp_path / "repo"
    assert main(["triton", str(tiny_fp16), "--repo", str(repo), "--backend", "onnx", "--prefix", "sdxl"]) == 0
    dec = (repo / "sdxl_decoder" / "config.pbtxt").read_text()
    assert 'name: "sdxl_decoder"' in dec and 'platform: "onnxruntime_onnx"' in dec
    assert "max_batch_size: 4" in dec
    assert 'name: "latent_sample"' in dec and "data_type: TYPE_FP16" in dec and "dims: [ 4, -1, -1 ]" in dec
    assert 'name: "sample"' in dec and "dims: [ 3, -1, -1 ]" in dec
    enc = (repo / "sdxl_encoder" / "config.pbtxt").read_text()
    assert 'name: "latent_parameters"' in enc and "dims: [ 8, -1, -1 ]" in enc
    assert sha256_file(repo / "sdxl_decoder" / "1" / "model.onnx") == sha256_file(tiny_fp16 / "decoder.onnx")


def test_tensorrt_repository_uses_the_engine_profile(tmp_path, tiny_fp16):
    folder = tmp_path / "export"
    shutil.copytree(tiny_fp16, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    plan = b"not a real plan: the writer only copies it"
    (folder / "decoder.plan").write_bytes(plan)
    profile = {"min": [1, 4, 16, 24], "opt": [1, 4, 16, 24], "max": [2, 4, 16, 24]}
    manifest["components"]["decoder"]["engine"] = {"file": "decoder.plan", "sha256": hashlib.sha256(plan).hexdigest(),
                                                   "profiles": [{"latent_sample": profile}]}
    del manifest["components"]["encoder"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (written,) = write_triton_repo(folder, tmp_path / "repo")
    config = (written / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 2" in config
    # One static size in every profile: Triton is told the exact dims (output ×2 for the tiny VAE).
    assert "dims: [ 4, 16, 24 ]" in config and "dims: [ 3, 32, 48 ]" in config
    assert (written / "1" / "model.plan").read_bytes() == plan
    write_triton_repo(folder, tmp_path / "repo", backend="onnx")
    assert not (written / "1" / "model.plan").exists() and (written / "1" / "model.onnx").exists()
    profile["min"][0] = 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="Triton sends batches from 1"):
        write_triton_repo(folder, tmp_path / "repo")


def test_tensorrt_repository_without_engines_is_refused(tmp_path, tiny_fp16):
    with pytest.raises(OptionError, match="has no decoder engine.*--backend onnx"):
        write_triton_repo(tiny_fp16, tmp_path / "repo")
