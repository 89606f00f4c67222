"""`vae-export doctor`: the machine report and the folder check, on this CPU machine.

Folders with engines carry fake plan bytes: the doctor hashes and compares them against the manifest,
it never loads them. The GPU-machine cases judge a folder against a described environment
(`check_folder(dir, env)`); no engine is built or run here.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from trtvae.cli import main
from trtvae.doctor import check_folder, diagnose
from trtvae.runtime.engine_check import rebuild_command

NO_GPU = not torch.cuda.is_available()
H100 = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_gib": 79.1, "count": 1},
        "tensorrt": {"version": "10.16.1.11", "error": None, "builder": "ok"},
        "onnxruntime": {"version": "1.22.0", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
        "builds_here": {"onnx": True, "tensorrt_engines": True, "why_not": None}}
CPU = {**H100, "gpu": None, "tensorrt": {"version": None, "error": "not installed", "builder": None},
       "onnxruntime": {"version": "1.22.0", "providers": ["CPUExecutionProvider"]},
       "builds_here": {"onnx": True, "tensorrt_engines": False, "why_not": "TensorRT is not installed"}}


def _with_engine(tmp_path, tiny_fp32, trt_version="10.16.1.11", capability="9.0"):
    folder = tmp_path / "export"
    shutil.copytree(tiny_fp32, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    plan = b"fake plan bytes: hashed, never loaded"
    (folder / "decoder.plan").write_bytes(plan)
    manifest["components"]["decoder"]["engine"] = {
        "file": "decoder.plan", "sha256": hashlib.sha256(plan).hexdigest(), "tensorrt_version": trt_version,
        "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": capability,
        "profiles": [{"latent_sample": {"min": [1, 4, 8, 8], "opt": [1, 4, 16, 16], "max": [4, 4, 32, 32]}}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


@pytest.mark.skipif(not NO_GPU, reason="checks what a CPU-only machine is told")
def test_machine_report_on_cpu_says_no_gpu_and_ortvae(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "GPU           none: torch sees no CUDA GPU" in out
    assert "No GPU is present on this machine" in out and "OrtVae runs an export folder here" in out
    assert "ONNX Runtime  " in out and "CPUExecutionProvider" in out
    assert "builds ONNX only here; engines not: " in out
    assert out.rstrip().endswith("exit 0: everything needed is present")


@pytest.mark.skipif(not NO_GPU, reason="checks what a CPU-only machine is told")
def test_folder_without_engines_runs_with_ortvae_on_cpu(capsys, tiny_fp32):
    assert main(["doctor", str(tiny_fp32)]) == 0
    out = capsys.readouterr().out
    assert "decoder ONNX: ok" in out and "encoder ONNX: ok" in out
    steps = json.loads((tiny_fp32 / "manifest.json").read_text())["components"]["decoder"]["segments"]["steps"]
    assert f"decoder segment graphs (exact tiling): ok ({len(steps)} graphs, 0 TensorRT plans)" in out
    assert "TensorRT engines: none in this folder" in out and "runs here with: OrtVae" in out
    assert main(["doctor", str(tiny_fp32), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 0 and report["environment"]["gpu"] is None
    assert report["folder"]["runs_with"] == "OrtVae" and report["folder"]["engines"] == {}
    assert report["environment"]["torch"]["version"] == torch.__version__
    assert set(report["environment"]) >= {"driver", "tensorrt", "polygraphy", "onnxruntime", "builds_here"}


@pytest.mark.skipif(not NO_GPU, reason="checks what a CPU-only machine is told")
def test_folder_with_engines_on_cpu_exits_1_with_the_rebuild_command(capsys, tmp_path, tiny_fp32):
    folder, manifest = _with_engine(tmp_path, tiny_fp32)
    assert main(["doctor", str(folder)]) == 1
    out = capsys.readouterr().out
    assert ("decoder engine decoder.plan (TensorRT 10.16.1.11, NVIDIA H100 80GB HBM3 (compute capability 9.0)): "
            "cannot run here: no CUDA GPU is present; TensorRT is not installed") in out
    assert "runs here with: OrtVae" in out  # the ONNX files still run here
    assert "timing.cache" not in out
    assert f"rebuild the engines on the GPU machine that will run them: {rebuild_command(manifest, folder)}" in out
    assert out.rstrip().endswith("exit 1: something needed is missing (see above)")
    (folder / "timing.cache").write_bytes(b"tactics")
    assert main(["doctor", str(folder)]) == 1
    assert "timing.cache: with no record of where it was made; no build possible here" in capsys.readouterr().out


def test_engines_judged_against_a_gpu_machine(tmp_path, tiny_fp32):
    folder, manifest = _with_engine(tmp_path, tiny_fp32)
    same = check_folder(folder, H100)
    assert same["ok"] and same["engines"]["decoder"]["runs_here"] and same["rebuild_command"] is None
    assert same["runs_with"] == "TRTVae (or OrtVae)"
    other = check_folder(folder, {**H100, "tensorrt": {**H100["tensorrt"], "version": "11.4.0.106"},
                                  "gpu": {**H100["gpu"], "compute_capability": "8.9"}})
    assert not other["ok"] and other["rebuild_command"] == rebuild_command(manifest, folder)
    assert other["engines"]["decoder"]["problems"] == [
        "built with TensorRT 10.16.1.11, this machine has TensorRT 11.4.0.106",
        "built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is compute capability 8.9"]
    assert same["timing_cache"] is None  # none in the folder
    (folder / "timing.cache").write_bytes(b"tactics")
    (folder / "timing.cache.json").write_text(json.dumps({"file": "timing.cache", "gpu": "NVIDIA H100 80GB HBM3",
                                                          "compute_capability": "9.0",
                                                          "tensorrt_version": "10.16.1.11"}))
    assert check_folder(folder, H100)["timing_cache"]["reused_by_a_build_here"] is True
    assert check_folder(folder, CPU)["timing_cache"]["reused_by_a_build_here"] is None
    moved = check_folder(folder, {**H100, "tensorrt": {**H100["tensorrt"], "version": "11.4.0.106"}})["timing_cache"]
    assert moved["reused_by_a_build_here"] is False and moved["problems"] == [
        "with TensorRT 10.16.1.11 (this machine: 11.4.0.106)"]
    (folder / "decoder.plan").write_bytes(b"changed after export")
    changed = check_folder(folder, H100)
    assert not changed["ok"] and "does not match the manifest" in changed["engines"]["decoder"]["problems"][0]
    # No engines, but this machine could build them: fine to run (OrtVae), and the command that adds them.
    plain = check_folder(tiny_fp32, H100)
    assert plain["ok"] and plain["runs_with"] == "OrtVae" and plain["rebuild_command"].endswith(
        "--engines required --profile batch=1-4,resolution=512-1536")
    assert check_folder(tiny_fp32, CPU)["rebuild_command"] is None  # nothing to build with here
    no_ort = check_folder(tiny_fp32, {**CPU, "onnxruntime": {"version": None, "providers": []}})
    assert not no_ort["ok"] and no_ort["runs_with"] is None


def test_broken_folders_exit_1_with_what_is_wrong(tmp_path, tiny_fp32, capsys):
    assert main(["doctor", str(tmp_path / "nowhere")]) == 1
    assert "nowhere does not exist: expected an export folder holding manifest.json" in capsys.readouterr().err
    assert main(["doctor", str(tmp_path)]) == 1
    assert "cannot be read: " in capsys.readouterr().out and "not a finished trtvae export" in diagnose(
        tmp_path)["folder"]["error"]
    folder = tmp_path / "copy"
    shutil.copytree(tiny_fp32, folder)
    (folder / "encoder.onnx").write_bytes(b"changed")
    report = diagnose(folder)
    assert report["exit_code"] == 1 and "does not match the manifest" in report["folder"]["components"]["encoder"][
        "onnx"] and report["folder"]["components"]["decoder"]["onnx"] == "ok"
    # A changed segment graph fails the folder too: exact tiling would refuse it at the first tiled decode.
    shutil.copy(tiny_fp32 / "encoder.onnx", folder / "encoder.onnx")
    segment = json.loads((folder / "manifest.json").read_text())["components"]["decoder"]["segments"]["steps"][3]
    (folder / segment["file"]).write_bytes(b"changed")
    report = diagnose(folder)
    assert report["exit_code"] == 1
    assert segment["file"] in report["folder"]["components"]["decoder"]["segments"]
    assert "does not match the manifest" in report["folder"]["components"]["decoder"]["segments"]
    with pytest.raises(SystemExit):
        main(["doctor", "--no-such-flag"])
