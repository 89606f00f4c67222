"""The export's engine stage where TensorRT is absent, the post-build I/O type check, the timing cache, the probe."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import HAS_TRT

from trtvae.components import component_specs
from trtvae.errors import OptionError

SPECS = component_specs({"block_out_channels": [128, 256, 512, 512], "latent_channels": 4})


def test_export_options_reach_the_manifest(tiny_fp16):
    from trtvae.manifest import read_manifest

    opts = read_manifest(tiny_fp16)["export_options"]
    assert opts["precision"] == "fp16" and opts["components"] == ["decoder", "encoder"]
    assert opts["profiles"] == ["batch=1-4,resolution=512-1536"] and opts["rescale"] is True
    # The normalized command line: non-default options only, local paths absolute, profiles as --profile.
    assert opts["args"] == ["--model", str(Path(opts["model"]).resolve()), "--out", str(tiny_fp16.resolve()),
                            "--profile", "batch=1-4,resolution=512-1536"]


def test_the_rebuild_command_is_the_export_args_with_the_folder_and_engines_required(tmp_path):
    from trtvae.export.options import ExportOptions
    from trtvae.runtime.engine_check import rebuild_command

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    opts = ExportOptions(model="someone/vae", components="decoder", rescale=False, fp32_norm=True, verify=False,
                         engines="skip", static="1024x768", batch="1-2", optimization_level=5, workspace_gib=None,
                         images=images, subfolder="vae", allow_pickle=True)
    opts.check()
    manifest = {"precision": "fp16", "source": {"kind": "hub", "model": "someone/vae"},
                "export_options": opts.as_manifest()}
    assert rebuild_command(manifest, "out dir") == (
        "vae-export --model someone/vae --precision fp16 --out 'out dir' --engines required --components decoder "
        "--no-verify --no-rescale --fp32-norm --builder-optimization-level 5 --subfolder vae "
        f"--images {images.resolve()} --allow-pickle --profile batch=1-2,static=1024x768")
    # Any option, present or future, travels through the arguments: none is named by the rebuild command.
    manifest["export_options"]["args"].append("--some-new-flag")
    assert rebuild_command(manifest, "o").endswith("--profile batch=1-2,static=1024x768 --some-new-flag")



@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")
def test_export_says_in_one_line_which_engines_were_not_built(tmp_path, tiny_dir, capsys):
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    out = run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=tmp_path / "o",
                                   components=("decoder",), verify=False))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "engines not built" in ln]
    assert lines == ["! TensorRT engines not built (decoder): TensorRT is not installed (pip install tensorrt, "
                     "or the .[gpu] extra)"]
    assert (out / "manifest.json").exists()
    with pytest.raises(OptionError, match="--engines required, but TensorRT is not installed"):
        run_export(ExportOptions(model=str(tiny_dir), out=tmp_path / "req", engines="required"))
    assert not (tmp_path / "req").exists()  # refused before any work
    run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=tmp_path / "s", components=("decoder",),
                             verify=False, engines="skip"))
    assert "engines not built" not in capsys.readouterr().out


def test_engine_io_dtypes_must_carry_the_onnx_types():
    from trtvae.errors import ExportError
    from trtvae.export.engine import check_io_dtypes

    io16 = [{"name": "latent_sample", "dtype": "HALF"}, {"name": "sample", "dtype": "HALF"}]
    fp16 = {"latent_sample": "float16", "sample": "float16"}
    check_io_dtypes(io16, fp16, "decoder engine")
    check_io_dtypes([{"name": "sample", "dtype": "BF16"}], {"sample": "bfloat16"}, "encoder engine")
    # An fp32 ONNX builds an fp32 engine without a word from TensorRT: caught here.
    with pytest.raises(ExportError, match=r"decoder engine I/O is latent_sample=FLOAT \(expected HALF\), "
                                          r"sample=FLOAT \(expected HALF\)"):
        check_io_dtypes([{**t, "dtype": "FLOAT"} for t in io16], fp16, "decoder engine")
    # A segment plan mixes types: x in the model's type, statistics and activations in float32.
    segment = [{"name": "x", "dtype": "HALF"}, {"name": "mean", "dtype": "FLOAT"}, {"name": "y", "dtype": "FLOAT"}]
    check_io_dtypes(segment, {"x": "float16", "mean": "float32", "y": "float32"}, "decoder segment conv_in plan")
    with pytest.raises(ExportError, match=r"segment plan I/O is mean=HALF \(expected FLOAT\), "
                                          r"extra=FLOAT \(expected no such tensor in the ONNX graph\)"):
        check_io_dtypes([segment[0], {"name": "mean", "dtype": "HALF"}, {"name": "extra", "dtype": "FLOAT"}],
                        {"x": "float16", "mean": "float32"}, "decoder segment plan")


HERE = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.16.1.11"}


def test_timing_cache_from_elsewhere_is_moved_aside_and_recorded(tmp_path, capsys):
    from trtvae.export.engine import (STALE_TIMING_CACHE, TIMING_CACHE, finish_timing_cache, prepare_timing_cache,
                                      read_timing_cache_record, timing_cache_mismatches)

    assert prepare_timing_cache(tmp_path, HERE) is None  # nothing yet
    (tmp_path / TIMING_CACHE).write_bytes(b"tactics")
    (tmp_path / f"{TIMING_CACHE}.lock").write_bytes(b"")  # what Polygraphy's LockFile leaves
    record = finish_timing_cache(tmp_path, HERE)
    assert record == {"file": TIMING_CACHE, **HERE} and read_timing_cache_record(tmp_path) == record
    assert not (tmp_path / f"{TIMING_CACHE}.lock").exists()
    assert prepare_timing_cache(tmp_path, HERE) == tmp_path / TIMING_CACHE  # same machine: reused
    assert capsys.readouterr().out == ""

    elsewhere = {**HERE, "gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    assert timing_cache_mismatches(record, elsewhere) == [
        "with GPU NVIDIA H100 80GB HBM3 (this machine: NVIDIA GeForce RTX 4090)",
        "with compute capability 9.0 (this machine: 8.9)"]
    assert prepare_timing_cache(tmp_path, elsewhere) is None
    assert (tmp_path / STALE_TIMING_CACHE).read_bytes() == b"tactics" and not (tmp_path / TIMING_CACHE).exists()
    assert read_timing_cache_record(tmp_path) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "moved aside to timing.cache.stale" in lines[0] and "RTX 4090" in lines[0]

    # A cache with no record (an older export's) cannot be trusted either; a newer TensorRT neither.
    (tmp_path / TIMING_CACHE).write_bytes(b"old")
    assert prepare_timing_cache(tmp_path, HERE) is None and (tmp_path / STALE_TIMING_CACHE).read_bytes() == b"old"
    assert "without a timing.cache.json" in capsys.readouterr().out
    assert timing_cache_mismatches(record, {**HERE, "tensorrt_version": "11.4.0.106"}) == [
        "with TensorRT 10.16.1.11 (this machine: 11.4.0.106)"]
    (tmp_path / "timing.cache.json").write_text("not json")
    assert read_timing_cache_record(tmp_path) is None
    assert finish_timing_cache(tmp_path, HERE) is None  # no cache: nothing recorded


def _fake_tensorrt(monkeypatch, builder):
    import importlib.machinery
    import sys
    import types

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = "10.8.0.43"
    trt.Logger = type("Logger", (), {"ERROR": 1, "WARNING": 2, "__init__": lambda self, severity: None})
    trt.Builder = builder
    pg = types.ModuleType("polygraphy")
    pg.__spec__ = importlib.machinery.ModuleSpec("polygraphy", None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "polygraphy", pg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_a_builder_that_cannot_be_created_skips_engines_with_a_reason(monkeypatch, tmp_path, capsys):
    from trtvae.export.engine import engines_unavailable_reason
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import _build_engines

    def old_driver(logger):
        raise TypeError("__init__(): incompatible constructor arguments. pybind11::init(): factory function "
                        "returned nullptr")

    _fake_tensorrt(monkeypatch, old_driver)
    reason = engines_unavailable_reason()
    assert reason.startswith("TensorRT 10.8.0.43 cannot create a builder on this machine (TypeError: __init__(): ")
    assert "driver" in reason
    _build_engines(tmp_path, {"spatial_factor": 8}, SPECS, ExportOptions(components=("decoder",)))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "not built" in ln]
    assert len(lines) == 1 and lines[0].startswith("! TensorRT engines not built (decoder): TensorRT 10.8.0.43 cannot")
    with pytest.raises(OptionError, match="--engines required, but TensorRT 10.8.0.43 cannot create a builder"):
        ExportOptions(out=tmp_path / "x", engines="required").check()
    _fake_tensorrt(monkeypatch, lambda logger: None)
    assert "returned no builder" in engines_unavailable_reason()
    made = []
    _fake_tensorrt(monkeypatch, lambda logger: made.append(logger) or object())
    assert engines_unavailable_reason() is None
    # The option check, the engine stage and every build ask again: one builder serves them all.
    from trtvae.export.environment import probe

    assert engines_unavailable_reason() is None and probe().builder is probe().builder and len(made) == 1


def test_the_timing_cache_record_reaches_the_manifest(monkeypatch, tmp_path):
    import trtvae.export.run as run
    from trtvae.export.engine import TIMING_CACHE, finish_timing_cache
    from trtvae.export.options import ExportOptions

    def fake_build(onnx_path, plan_path, spec, factor, precision, options):  # what build_engine leaves behind
        (plan_path.parent / TIMING_CACHE).write_bytes(b"tactics")
        finish_timing_cache(plan_path.parent, HERE)
        return {"file": plan_path.name}

    monkeypatch.setattr(run, "engines_unavailable_reason", lambda: None)
    monkeypatch.setattr(run, "build_engine", fake_build)
    manifest = {"spatial_factor": 8, "components": {"decoder": {"onnx": "decoder.onnx"}}}
    run._build_engines(tmp_path, manifest, SPECS, ExportOptions(components=("decoder",)))
    assert manifest["timing_cache"] == {"file": TIMING_CACHE, **HERE}
    assert manifest["components"]["decoder"]["engine"] == {"file": "decoder.plan"}


def test_component_engines_and_segment_plans_share_one_build(monkeypatch, tmp_path):
    import trtvae.export.engine as engine
    from trtvae.profiles import make_profile

    calls = []

    def fake_plan(onnx_path, plan_path, what, profiles, io_types, options, monitor=True):
        calls.append((what, profiles, io_types, monitor))
        return {"file": plan_path.name, "profiles": profiles, "build": {"strongly_typed": True}}

    monkeypatch.setattr(engine, "build_plan", fake_plan)
    options = engine.EngineOptions(profiles=[make_profile(8)], profile_options=["batch=1-4,resolution=512-1536"])
    entry = engine.build_engine(tmp_path / "decoder.onnx", tmp_path / "decoder.plan", SPECS["decoder"], 8, "fp16",
                                options)
    # The default profile in latents: 512/8, 1024/8 (opt), 1536/8; batch 1-4.
    assert calls == [("decoder engine", [{"latent_sample": {"min": [1, 4, 64, 64], "opt": [1, 4, 128, 128],
                                                              "max": [4, 4, 192, 192]}}],
                      {"latent_sample": "float16", "sample": "float16"}, True)]
    assert entry["profiles_px"] == [{"batch": [1, 1, 4], "height": [512, 1024, 1536], "width": [512, 1024, 1536]}]
    assert entry["build"] == {"strongly_typed": True, "profile_options": ["batch=1-4,resolution=512-1536"]}
