"""Triton model repository written from an export folder's manifest."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from trtvae.cli import main
from trtvae.errors import OptionError
from trtvae.files import sha256_file
from trtvae.serving.repository import write_triton_repo


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


def test_python_repository_is_self_contained(tmp_path, tiny_fp16):
    repo = tmp_path / "repo"
    assert main(["triton", str(tiny_fp16), "--repo", str(repo), "--backend", "python", "--instances", "2"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["vae_decode_image", "vae_decoder", "vae_encoder"]
    config = (repo / "vae_decode_image" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 4" in config and "dynamic_batching" in config
    assert 'name: "latents"' in config and "TYPE_FP32" in config and 'name: "image"' in config
    assert "TYPE_UINT8" in config and "dims: [ -1, -1, 3 ]" in config and "count: 2" in config
    assert 'key: "trtvae_model" value: { string_value: "decode_image" }' in config
    assert "export_dir" not in config  # the export travels with the repository
    export = repo / "vae_encoder" / "1" / "export"
    assert sorted(p.name for p in export.iterdir()) == ["encoder.onnx", "manifest.json"]
    assert sha256_file(export / "encoder.onnx") == sha256_file(tiny_fp16 / "encoder.onnx")
    narrowed = json.loads((export / "manifest.json").read_text())
    assert list(narrowed["components"]) == ["encoder"] and narrowed["vae_config"]["scaling_factor"] == 0.5
    assert "TritonPythonModel" in (repo / "vae_encoder" / "1" / "model.py").read_text()
    # Rewritten for another backend, nothing of the Python models stays behind in a shared name.
    write_triton_repo(tiny_fp16, repo, backend="onnx")
    assert not (repo / "vae_decoder" / "1" / "model.py").exists()
    assert not (repo / "vae_decoder" / "1" / "export").exists()


@pytest.mark.parametrize("kwargs,message", [({"backend": "python", "max_batch": 0}, "--max-batch 0"),
                                            ({"backend": "python", "prefix": "a b"}, "--prefix"),
                                            ({"backend": "grpc"}, "--backend 'grpc'")])
def test_repository_options_are_checked(tmp_path, tiny_fp16, kwargs, message):
    with pytest.raises(OptionError, match=message):
        write_triton_repo(tiny_fp16, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_python_repository_loads_in_the_bundled_tritonserver(tmp_path, tiny_fp16):
    """The portable repository on the tritonserver binary itself (not through `vae-export serve`)."""
    pytest.importorskip("pytriton", reason="needs the triton extra: pip install -e '.[triton]'")
    import numpy as np
    import torch
    import tritonclient.http as http
    from triton_helpers import infer, processes_mentioning

    from trtvae import OrtVae
    from trtvae.serving.server import TritonServer, free_port

    repo = tmp_path / "portable"
    write_triton_repo(tiny_fp16, repo, backend="python")
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    try:
        server.wait_ready(["vae_decoder", "vae_encoder", "vae_decode_image"], timeout_s=240)
        z = np.random.default_rng(0).standard_normal((3, 4, 5, 7)).astype(np.float16)
        out = infer(http, f"127.0.0.1:{server.http_port}", "vae_decoder", "latent_sample", z, "sample")
        np.testing.assert_array_equal(out, OrtVae.from_pretrained(tiny_fp16).decode(torch.from_numpy(z)).sample.numpy())
        assert "runs OrtVae on cpu" in server.log_tail(200)
    finally:
        server.stop()
    assert processes_mentioning(str(repo)) == []


def test_python_backend_refuses_bf16_and_quotes_paths(tmp_path, tiny_fp16):
    folder = tmp_path / 'odd "dir"'
    shutil.copytree(tiny_fp16, folder)
    write_triton_repo(folder, tmp_path / "repo", backend="python", export_in_place=True)
    config = (tmp_path / "repo" / "vae_decoder" / "config.pbtxt").read_text()
    assert 'string_value: "' + str(folder.resolve()).replace('"', '\\"') + '"' in config
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(io_dtype="bfloat16", precision="bf16")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="--backend python serves fp32 and fp16 exports; this one is bf16"):
        write_triton_repo(folder, tmp_path / "repo2", backend="python")
