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

pytest.importorskip("tritonclient.grpc", reason="config.pbtxt is Triton's ModelConfig: needs the triton extra")
from triton_helpers import read_config  # noqa: E402


def _io(config) -> dict:
    """{tensor name: (Triton type name, dims)} of a parsed config's inputs and outputs."""
    from tritonclient.grpc import model_config_pb2 as pb

    return {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in [*config.input, *config.output]}


def test_onnx_repository(tmp_path, tiny_fp16):
    repo = tmp_path / "repo"
    assert main(["triton", str(tiny_fp16), "--repo", str(repo), "--backend", "onnx", "--prefix", "sdxl"]) == 0
    dec = read_config(repo / "sdxl_decoder" / "config.pbtxt")
    assert dec.name == "sdxl_decoder" and dec.platform == "onnxruntime_onnx" and not dec.backend
    assert dec.max_batch_size == 4
    assert _io(dec) == {"latent_sample": ("TYPE_FP16", [4, -1, -1]), "sample": ("TYPE_FP16", [3, -1, -1])}
    assert [t.name for t in dec.input] == ["latent_sample"] and [t.name for t in dec.output] == ["sample"]
    enc = read_config(repo / "sdxl_encoder" / "config.pbtxt")
    assert _io(enc)["latent_parameters"] == ("TYPE_FP16", [8, -1, -1])
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
    config = read_config(written / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 2
    # One static size in every profile: Triton is told the exact dims (output ×2 for the tiny VAE).
    assert _io(config) == {"latent_sample": ("TYPE_FP16", [4, 16, 24]), "sample": ("TYPE_FP16", [3, 32, 48])}
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
    config = read_config(repo / "vae_decode_image" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert _io(config) == {"latents": ("TYPE_FP32", [4, -1, -1]), "image": ("TYPE_UINT8", [-1, -1, 3])}
    from tritonclient.grpc import model_config_pb2 as pb

    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_CPU")]
    assert {k: v.string_value for k, v in config.parameters.items()} == \
        {"trtvae_model": "decode_image", "prefix": "vae", "runtime": "auto", "tile": "auto"}  # no export_dir: it travels
    export = repo / "vae_encoder" / "1" / "export"
    # The encoder's graph and its exact-tiling segment graphs travel, nothing of the decoder's.
    encoder_files = sorted(p.name for p in tiny_fp16.glob("encoder*.onnx"))
    assert "encoder.segment00.onnx" in encoder_files
    assert sorted(p.name for p in export.iterdir()) == sorted([*encoder_files, "manifest.json"])
    for name in encoder_files:
        assert sha256_file(export / name) == sha256_file(tiny_fp16 / name)
    narrowed = json.loads((export / "manifest.json").read_text())
    assert list(narrowed["components"]) == ["encoder"] and narrowed["vae_config"]["scaling_factor"] == 0.5
    assert "TritonPythonModel" in (repo / "vae_encoder" / "1" / "model.py").read_text()
    write_triton_repo(tiny_fp16, repo, backend="python", tile=64)
    assert read_config(repo / "vae_decoder" / "config.pbtxt").parameters["tile"].string_value == "64"
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

    from triton_helpers import free_port

    from trtvae import OrtVae
    from trtvae.serving.server import TritonServer

    repo = tmp_path / "portable"
    write_triton_repo(tiny_fp16, repo, backend="python")
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    try:
        server.wait_ready(["vae_decoder", "vae_encoder", "vae_decode_image"], timeout_s=240)
        z = np.random.default_rng(0).standard_normal((3, 4, 5, 7)).astype(np.float16)
        out = infer(http, f"127.0.0.1:{server.http_port}", "vae_decoder", "latent_sample", z, "sample")
        np.testing.assert_array_equal(out, OrtVae.from_pretrained(tiny_fp16).decode(torch.from_numpy(z)).sample.numpy())
        log = server.log_tail(200)
        assert "runs OrtVae on cpu" in log and "tiling: exact above 32 px a side" in log  # TINY_CONFIG's sample_size
    finally:
        server.stop()
    assert processes_mentioning(str(repo)) == []


def test_python_backend_refuses_bf16_and_quotes_paths(tmp_path, tiny_fp16):
    folder = tmp_path / 'odd "dir"'
    shutil.copytree(tiny_fp16, folder)
    write_triton_repo(folder, tmp_path / "repo", backend="python", export_in_place=True)
    config = read_config(tmp_path / "repo" / "vae_decoder" / "config.pbtxt")
    assert config.parameters["export_dir"].string_value == str(folder.resolve())  # one value, quote and all
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(io_dtype="bfloat16", precision="bf16")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="--backend python serves fp32 and fp16 exports; this one is bf16"):
        write_triton_repo(folder, tmp_path / "repo2", backend="python")
