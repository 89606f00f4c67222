"""TRTVae's exact tiling around its TensorRT calls, on the CPU: segment profiles, windows and chunks fed, options.

No TensorRT here: a TRTVae is made without it and its one TensorRT call (`_execute`) runs the same segment
graph on ONNX Runtime instead, after checking each input against the plan's profile the way TensorRT
would refuse it. Expectations come from the untiled decoder.onnx / encoder.onnx (OrtVae without tiling)
and from `trtvae.runtime.segments.windows`, never from the profile code under test.
"""
from __future__ import annotations

import copy
import json
import threading
import types

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import HAS_TRT

from trtvae import OrtVae
from trtvae.components import component_specs
from trtvae.export.engine import EngineOptions
from trtvae.export.segment_plans import segment_plan_name, segment_profiles
from trtvae.manifest import read_manifest
from trtvae.metrics import compare
from trtvae.profiles import exact_sizes, largest_core, make_profile, segment_window
from trtvae.runtime.base import VaeRuntime
from trtvae.runtime.segments import read_steps, resolution_ratios, windows
from trtvae.runtime.trt import TRTVae

EXACT_FP32 = 1e-5
BATCH = "1-2"  # the export's batch range: a batch of 3 must run in parts


def _with_plans(folder) -> dict:
    """The export's manifest with a plan entry per segment, as `vae-export --engines required` records it."""
    manifest = read_manifest(folder)
    specs = component_specs(manifest["vae_config"])
    options = EngineOptions(profiles=[make_profile(manifest["spatial_factor"], batch=BATCH)])
    for name, entry in manifest["components"].items():
        for step, shapes in zip(entry["segments"]["steps"], segment_profiles(manifest, name, specs[name], options)):
            step["engine"] = {"file": segment_plan_name(step["file"]), "sha256": "0" * 64, "profiles": [shapes]}
    return manifest


def _within(shape, limits) -> bool:
    return len(shape) == len(limits["min"]) and all(
        lo <= s <= hi for lo, s, hi in zip(limits["min"], shape, limits["max"]))


def _onnx_execute(self, plan, index, inputs, output, dtype):
    """What TensorRT would do with the plan, on ONNX Runtime: refuse shapes outside its profile, else run."""
    component, step = plan
    entry = self.manifest["components"][component]["segments"]["steps"][step]
    limits = entry["engine"]["profiles"][index]
    assert set(inputs) == set(limits), (inputs.keys(), limits.keys())
    for name, t in inputs.items():
        assert _within(tuple(t.shape), limits[name]), f"{entry['name']}: {name} {tuple(t.shape)} not in {limits[name]}"
        self.fed.append((component, step, name, tuple(t.shape)))
    sessions = self.__dict__.setdefault("sessions", {})
    if plan not in sessions:
        sessions[plan] = onnxruntime.InferenceSession(str(self.directory / entry["file"]))
    y = sessions[plan].run([output], {n: t.numpy() for n, t in inputs.items()})[0]
    assert y.dtype == np.dtype(str(dtype).removeprefix("torch."))
    return torch.from_numpy(y)


def _cpu_trtvae(folder, manifest=None, boundaries="device") -> TRTVae:
    vae = TRTVae.__new__(TRTVae)  # no TensorRT here: everything but `_execute`
    vae.exact_boundaries = boundaries
    VaeRuntime.__init__(vae, folder, manifest or _with_plans(folder))
    vae._device, vae._uploads, vae.profiles, vae.fed = torch.device("cpu"), threading.local(), {}, []
    vae._execute = types.MethodType(_onnx_execute, vae)
    return vae


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- profiles against the windows the runtime cuts ------------------------------------------------
def test_tiled_profiles_hold_every_window_and_are_static_at_the_default_tile(tiny_fp16):
    manifest = _with_plans(tiny_fp16)
    factor = manifest["spatial_factor"]
    for name, spec in component_specs(manifest["vae_config"]).items():
        entries = manifest["components"][name]["segments"]["steps"]
        steps = read_steps(manifest["components"][name]["segments"])
        core0, _, multiple = exact_sizes(manifest["vae_config"], spec, factor)
        assert core0 == (16 if name == "decoder" else 32)  # sample_size 32, factor 2
        for step, (num, den) in zip(steps, resolution_ratios(steps)):
            if step.kind != "tiled":
                continue
            x = entries[step.index]["engine"]["profiles"][0]["x"]
            assert x["opt"][1:] == x["max"][1:] and x["opt"][2] == x["opt"][3]  # one window side: static-ish
            for size in range(multiple, 12 * core0, multiple):  # every input side, smaller and larger than a tile
                for core in (core0, core0 // 2, 3):
                    lengths = {y1 - y0 for y0, y1, _, _ in windows(size * num // den, core * num // den, step.halo,
                                                                   step.align)}
                    assert all(x["min"][2] <= n <= x["max"][2] for n in lengths), (step.name, size, core, lengths)
            # At the default tile, large axes run windows of exactly the plan's opt side.
            assert max(a[1] - a[0] for a in windows(8 * core0 * num // den, core0 * num // den, step.halo,
                                                     step.align)) == x["opt"][2]


def test_a_larger_tile_is_clamped_to_the_largest_core_whose_windows_fit(tiny_fp16):
    manifest = _with_plans(tiny_fp16)
    steps = read_steps(manifest["components"]["decoder"]["segments"])
    entries = manifest["components"]["decoder"]["segments"]["steps"]
    ratios = resolution_ratios(steps)
    tiled = [(ratios[s.index], s.halo, s.align, entries[s.index]["engine"]["profiles"][0]["x"]["max"][2])
             for s in steps if s.kind == "tiled"]

    def widest(core):  # the longest window over all tiled steps, as the runtime cuts a large image
        return max(max(b - a for a, b, _, _ in windows(64 * n // d, core * n // d, halo, align)) - top
                   for (n, d), halo, align, top in tiled)

    assert largest_core(16, tiled) == 16 and largest_core(7, tiled) == 7
    for asked in (17, 24, 100):
        core = largest_core(asked, tiled)
        assert core == 16 and widest(core) <= 0 < widest(core + 1)
    vae = _cpu_trtvae(tiny_fp16, manifest)
    vae.tile_latent_min_size = 40
    assert vae._exact_core("decoder") == 16
    vae.tile_latent_min_size = 9
    assert vae._exact_core("decoder") == 9
    assert segment_window(15, 2, 2) == 18 and segment_window(1, 0, 2) == 2  # cores rounded down to the alignment


def test_attention_and_whole_profiles_reach_the_max_image_side(tiny_fp16):
    manifest = _with_plans(tiny_fp16)
    rows = next(s for s in manifest["components"]["decoder"]["segments"]["steps"] if s["kind"] == "attention")
    limits = rows["engine"]["profiles"][0]
    assert set(limits) == {"x", "kv", "residual"}
    # 8192-px images at factor 2: 4096 latent pixels; the query rows of one default window at most.
    assert limits["kv"]["max"] == [2, rows["inputs"][1]["shape"][1], 4096, 4096]
    assert limits["x"]["max"] == [2, rows["in_channels"], 16, 4096] == [*limits["residual"]["max"][:2], 16, 4096]
    assert limits["x"]["min"] == [1, rows["in_channels"], 1, 1]
    norm = manifest["components"]["decoder"]["segments"]["steps"][1]["engine"]["profiles"][0]
    assert norm["mean"] == norm["rstd"] == {"min": [1, 64], "opt": [1, 64], "max": [2, 64]}


# --- exact tiling through TRTVae's segment runner -------------------------------------------------
@pytest.mark.parametrize("boundaries", ["device", "host"])
def test_exact_decode_with_plan_sized_windows_batch_parts_and_row_chunks(tiny_fp32, boundaries):
    z = _rand((3, 4, 40, 23), seed=11)  # batch 3 > the plans' 2; 40 rows > the attention plan's 16
    whole = OrtVae.from_pretrained(tiny_fp32).decode(z).sample
    vae = _cpu_trtvae(tiny_fp32, boundaries=boundaries)
    vae.attention_chunk_bytes = 2**40  # the runtime hands over every query row at once
    vae.tile_latent_min_size = 24  # larger than the plans' windows: clamped to 16
    vae.enable_tiling()
    assert vae.tiling_mode == "exact"
    stats = compare(vae.decode(z).sample, whole)
    assert stats.nonfinite == 0 and stats.rel_l2 <= EXACT_FP32, stats
    steps = vae._segment_steps("decoder")
    attention = next(s.index for s in steps if s.kind == "attention")
    fed = [(i, n, shape) for c, i, n, shape in vae.fed if c == "decoder"]
    assert {shape[0] for _, _, shape in fed} == {2, 1}  # batch 3 ran as 2 + 1
    assert sorted(shape[2] for i, n, shape in fed if i == attention and n == "x") == [8, 8, 16, 16, 16, 16]
    assert {shape[2] for i, n, shape in fed if i == attention and n == "kv"} == {40}
    # Windows of a halo-1 step: core 16 + 2 (not the asked 24 + 2); the 23-wide axis runs in two shifted windows.
    assert {shape[2:] for i, n, shape in fed if i == 1 and n == "x"} == {(18, 18)}


def test_exact_encode_through_segment_plans(tiny_fp32):
    x = torch.rand(2, 3, 90, 50, generator=torch.Generator().manual_seed(12)) * 2 - 1
    whole = OrtVae.from_pretrained(tiny_fp32).encode(x).latent_dist.parameters
    vae = _cpu_trtvae(tiny_fp32)
    vae.enable_tiling()
    stats = compare(vae.encode(x).latent_dist.parameters, whole)
    assert stats.nonfinite == 0 and stats.rel_l2 <= EXACT_FP32, stats


def test_a_window_outside_the_plans_is_refused_with_the_limit(tiny_fp32):
    manifest = _with_plans(tiny_fp32)
    rows = next(s for s in manifest["components"]["decoder"]["segments"]["steps"] if s["kind"] == "attention")
    rows["engine"]["profiles"][0]["kv"]["max"][2] = 30  # as if built for smaller images
    vae = _cpu_trtvae(tiny_fp32, manifest)
    vae.enable_tiling()
    with pytest.raises(ValueError, match=r"decoder segment \d+ \(mid_block.attentions.0.rows\): kv \(1, 128, 40, 20\) "
                                         r"is outside min \[1, 128, 1, 1\] max \[2, 128, 30, 4096\] of its "
                                         r"TensorRT plan; .*EXACT_MAX_IMAGE_SIDE"):
        vae.decode(_rand((1, 4, 40, 20), seed=13))


def test_host_boundaries_upload_the_keys_and_values_once_and_free_them_with_the_original(tiny_fp32):
    vae = _cpu_trtvae(tiny_fp32, boundaries="host")
    assert vae._boundary_device(torch.zeros(1)) == torch.device("cpu")
    vae._device = torch.device("meta")  # stands for the GPU: a different device than the host tensor's
    kv = torch.randn(1, 8, 4, 4)
    first = vae._uploaded(kv)
    assert first.device.type == "meta" and vae._uploaded(kv) is first
    other = torch.randn(1, 8, 4, 4)
    assert vae._uploaded(other) is not first
    del other
    assert vae._uploads.__dict__ == {}  # gone with its source: no device copy outlives the step
    assert vae._uploaded(first) is first  # already on the device


# --- what an export without segment plans says, and the option ------------------------------------
def test_without_segment_plans_trtvae_says_why_and_blends(tiny_fp32):
    vae = _cpu_trtvae(tiny_fp32, read_manifest(tiny_fp32))
    why = vae._exact_unavailable("decoder")
    assert "segment graphs but no TensorRT plans" in why and "--engines required" in why
    assert vae.tiling_mode == "blend"
    manifest = _with_plans(tiny_fp32)
    partial = copy.deepcopy(manifest)
    del partial["components"]["encoder"]["segments"]["steps"][3]["engine"]
    assert _cpu_trtvae(tiny_fp32, partial)._exact_unavailable("encoder") is not None
    assert _cpu_trtvae(tiny_fp32, manifest).tiling_mode == "exact"


def test_exact_boundaries_option_is_checked_before_tensorrt_is_needed(tiny_fp32):
    with pytest.raises(ValueError, match=r"exact_boundaries='gpu'\): expected one of 'device', 'host'"):
        TRTVae.from_pretrained(tiny_fp32, exact_boundaries="gpu")


def _pretend_tensorrt_builds(monkeypatch, fake_plan) -> None:
    """The export's engine stage as if TensorRT were here: component engines recorded, segment plans by `fake_plan`."""
    import trtvae.export.run as run
    import trtvae.export.segment_plans as segment_plans

    monkeypatch.setattr(run, "engines_unavailable_reason", lambda: None)
    monkeypatch.setattr(run, "build_engine", lambda onnx_path, plan_path, *a: {"file": plan_path.name})
    monkeypatch.setattr(segment_plans, "build_plan", fake_plan)


def test_the_export_builds_one_plan_per_segment_with_the_graphs_own_io(monkeypatch, tmp_path, tiny_fp16):
    import onnx

    import trtvae.export.run as run
    from trtvae.export.options import ExportOptions

    built = []

    def fake_plan(onnx_path, plan_path, what, profiles, io_types, options, monitor=True):
        built.append((onnx_path, plan_path, profiles, io_types))
        return {"file": plan_path.name, "profiles": profiles}

    _pretend_tensorrt_builds(monkeypatch, fake_plan)
    manifest = json.loads((tiny_fp16 / "manifest.json").read_text())
    run._build_engines(tiny_fp16, manifest, component_specs(manifest["vae_config"]),
                       ExportOptions(components=("decoder", "encoder"), batch="1-3"))
    steps = [s for c in ("decoder", "encoder") for s in manifest["components"][c]["segments"]["steps"]]
    assert len(built) == len(steps)
    for step, (onnx_path, plan_path, profiles, io_types) in zip(steps, built):
        assert step["engine"]["file"] == plan_path.name == step["file"].replace(".onnx", ".plan")
        graph = onnx.load(onnx_path).graph  # the graph itself, not the manifest, says what the plan takes
        types_ = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                  for v in [*graph.input, *graph.output]}
        assert io_types == types_
        (shapes,) = profiles
        assert set(shapes) == {v.name for v in graph.input}
        for v in graph.input:
            dims = [d.dim_value or None for d in v.type.tensor_type.shape.dim]
            for key in ("min", "opt", "max"):
                assert len(shapes[v.name][key]) == len(dims)
                assert all(d is None or d == s for d, s in zip(dims, shapes[v.name][key])), (v.name, dims, shapes)
            assert shapes[v.name]["min"][0] == 1 and shapes[v.name]["max"][0] == 3


def test_a_segment_plan_tensorrt_cannot_build_costs_exact_tiling_not_the_export(monkeypatch, tmp_path, tiny_fp32):
    import shutil

    import trtvae.export.run as run
    from trtvae.errors import ExportError
    from trtvae.export.options import ExportOptions

    folder = tmp_path / "export"
    shutil.copytree(tiny_fp32, folder)

    def fake_plan(onnx_path, plan_path, what, profiles, io_types, options, monitor=True):
        if "attentions" in what:
            raise ExportError(f"TensorRT failed to build the {what}: out of tactics")
        plan_path.write_bytes(b"plan")
        return {"file": plan_path.name, "profiles": profiles}

    _pretend_tensorrt_builds(monkeypatch, fake_plan)
    manifest = json.loads((folder / "manifest.json").read_text())
    run._build_engines(folder, manifest, component_specs(manifest["vae_config"]),
                      ExportOptions(components=("decoder", "encoder")))
    for name in ("decoder", "encoder"):
        segments = manifest["components"][name]["segments"]
        assert "out of tactics" in segments["plans_error"]
        assert not any("engine" in step for step in segments["steps"])
        assert not list(folder.glob(f"{name}.segment*.plan"))  # the plans built before the failure are gone
    assert manifest["components"]["decoder"]["engine"] == {"file": "decoder.plan"}  # the export goes on
    vae = _cpu_trtvae(folder, manifest)
    assert "could not build TensorRT plans for the decoder segment graphs (TensorRT failed" in \
        vae._exact_unavailable("decoder")
    assert vae.tiling_mode == "blend"


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_segment_plans_tile_exactly_on_gpu(tmp_path, tiny_dir, tiny_ref):
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export
    from trtvae.metrics import passes

    out = run_export(ExportOptions(model=str(tiny_dir), precision="fp16", out=tmp_path / "e", engines="required",
                                   batch="1-2", resolution="16-64", opt=32, verify=False))
    segments = read_manifest(out)["components"]["decoder"]["segments"]
    assert all("engine" in s for s in segments["steps"]), segments.get("plans_error")
    inside = torch.randn(3, 4, 30, 23, device="cuda")  # within the engine's 32 latent px: untiled runs too
    beyond = torch.randn(3, 4, 50, 23, device="cuda")  # beyond it: tiled exactly without being asked
    with torch.no_grad():
        reference = tiny_ref.decode(beyond.cpu()).sample
    for boundaries in ("device", "host"):
        vae = TRTVae.from_pretrained(out, exact_boundaries=boundaries)
        untiled = vae.decode(inside).sample
        vae.enable_tiling()
        vae.tile_latent_min_size = 16
        assert vae.tiling_mode == "exact"
        exact = vae.decode(inside).sample
        assert exact.is_cuda and compare(exact, untiled).rel_l2 <= 5e-3
        assert passes(compare(vae.decode(beyond).sample.cpu(), reference), "fp16")
