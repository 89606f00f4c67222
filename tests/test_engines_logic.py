"""Everything around the TensorRT calls that can be decided without TensorRT or a GPU."""
from __future__ import annotations

import importlib.util
import threading
import time

import pytest
import torch

from trtvae.components import component_specs
from trtvae.errors import OptionError
from trtvae.profiles import (batch_ranges, component_shapes, make_profile, parse_profile_option, select_profile,
                             spatial_limits, verify_shapes)
from trtvae.runtime.contexts import ContextPool
from trtvae.runtime.engine_check import EngineMismatchError, check_engine, engine_mismatches, rebuild_command

SDXL = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
SPECS = component_specs(SDXL)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


# --- profiles in user terms ---------------------------------------------------------------
def test_default_profile_in_latents_and_pixels():
    p = make_profile(8)
    assert p.batch == (1, 1, 4) and p.height == (512, 1024, 1536) and p.width == (512, 1024, 1536)
    dec = component_shapes(p, SPECS["decoder"], 8)
    assert dec == {"min": [1, 4, 64, 64], "opt": [1, 4, 128, 128], "max": [4, 4, 192, 192]}
    enc = component_shapes(p, SPECS["encoder"], 8)
    assert enc == {"min": [1, 3, 512, 512], "opt": [1, 3, 1024, 1024], "max": [4, 3, 1536, 1536]}


def test_static_profile_is_width_by_height():
    p = make_profile(8, batch="2", static="1024x768")
    assert p.height == (768, 768, 768) and p.width == (1024, 1024, 1024) and p.batch == (2, 2, 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch="4-1"), r"--batch: '4-1' has min 4 > max 1"),
    (dict(batch="0-2"), "at least 1"),
    (dict(batch="a-2"), "not a positive whole number"),
    (dict(resolution="1536-512"), "min 1536 > max 512"),
    (dict(resolution="500-1536"), "500 px is not a multiple of the VAE's spatial factor 8"),
    (dict(resolution="512-1024", opt=2048), "--opt 2048 is outside --resolution 512-1024"),
    (dict(static="1024"), "not WIDTHxHEIGHT"),
    (dict(static="1020x1024"), "1020 px is not a multiple"),
])
def test_nonsense_profiles_are_rejected(kwargs, message):
    with pytest.raises(OptionError, match=message):
        make_profile(8, **kwargs)


def test_profile_option_syntax():
    p = parse_profile_option("batch=1-2,resolution=512-1024,opt=768", 8)
    assert p.batch == (1, 1, 2) and p.height == (512, 768, 1024)
    assert parse_profile_option("batch=1,static=1024x1024", 8).height == (1024,) * 3
    with pytest.raises(OptionError, match="not one of"):
        parse_profile_option("batches=1-2", 8)
    with pytest.raises(OptionError, match="exclude each other"):
        parse_profile_option("static=1024x1024,resolution=512-1024", 8)


def _profiles():
    small = component_shapes(make_profile(8, batch="1-8", resolution="512-1024", opt=768), SPECS["decoder"], 8)
    big = component_shapes(make_profile(8, batch="1-2", resolution="512-2048", opt=1024), SPECS["decoder"], 8)
    return [big, small]


def test_select_profile_picks_the_tightest_containing_one():
    profiles = _profiles()
    assert select_profile(profiles, (1, 4, 96, 96)) == 1  # both hold it: the smaller range wins
    assert select_profile(profiles, (1, 4, 200, 100)) == 0  # only the big one holds 1600 px
    assert select_profile(profiles, (4, 4, 200, 100)) is None  # batch 4 at 1600 px: neither
    assert select_profile(profiles, (1, 4, 32, 32)) is None  # below every min


def test_batch_ranges_and_spatial_limits():
    profiles = _profiles()
    assert batch_ranges(profiles, (16, 4, 96, 96)) == [(1, 2), (1, 8)]
    assert batch_ranges(profiles, (16, 4, 200, 200)) == [(1, 2)]
    assert batch_ranges(profiles, (1, 4, 300, 300)) == []
    assert spatial_limits(profiles) == ((64, 64), (256, 256))
    # A dynamic 512-1024 profile and a static 1536 one: 1200 px is in neither, so the dynamic one is the range.
    holes = [component_shapes(make_profile(8, resolution="512-1024"), SPECS["decoder"], 8),
             component_shapes(make_profile(8, batch="1", static="1536x1536"), SPECS["decoder"], 8)]
    assert spatial_limits(holes) == ((64, 64), (128, 128))


def test_verify_shapes_cover_min_opt_max_and_off_grid():
    dec = component_shapes(make_profile(8), SPECS["decoder"], 8)
    shapes = verify_shapes(dec)
    assert shapes[:3] == [(1, 4, 64, 64), (1, 4, 128, 128), (4, 4, 192, 192)]
    off_grid = shapes[3:]
    assert len(off_grid) == 2
    for s in off_grid:
        assert select_profile([dec], s) == 0
        assert s[2] != s[3] and s not in [tuple(v) for v in dec.values()]
    enc = component_shapes(make_profile(8), SPECS["encoder"], 8)
    for s in verify_shapes(enc, multiple=8):
        assert s[2] % 8 == 0 and s[3] % 8 == 0 and select_profile([enc], s) == 0


# --- compatibility before deserializing -------------------------------------------------------
ENTRY = {"file": "decoder.plan", "tensorrt_version": "10.13.0.35", "compute_capability": "9.0",
         "gpu": "NVIDIA H100 80GB HBM3", "build": {"profile_options": ["batch=1-4,resolution=512-1536"]}}
MANIFEST = {"precision": "fp16", "source": {"model": "madebyollin/sdxl-vae-fp16-fix"},
            "export_options": {"model": "madebyollin/sdxl-vae-fp16-fix", "precision": "fp16", "subfolder": None,
                               "components": ["decoder", "encoder"], "rescale": True, "fp32_norm": False,
                               "profiles": ["batch=1-4,resolution=512-1536"], "builder_optimization_level": 3,
                               "workspace_gib": 8.0},
            "components": {"decoder": {"engine": ENTRY}}}


def test_engine_mismatch_names_what_differs_and_how_to_rebuild():
    assert engine_mismatches(ENTRY, "10.13.0.35", "9.0") == []
    problems = engine_mismatches(ENTRY, "11.4.0.106", "8.6")
    assert "built with TensorRT 10.13.0.35, this machine has TensorRT 11.4.0.106" in problems[0]
    assert "compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is compute capability 8.6" in problems[1]
    with pytest.raises(EngineMismatchError) as e:
        check_engine("decoder", ENTRY, "10.13.0.35", "8.6", MANIFEST, "engines/sdxl")
    text = str(e.value)
    assert "decoder engine decoder.plan cannot run here" in text
    assert ("vae-export --model madebyollin/sdxl-vae-fp16-fix --precision fp16 --out engines/sdxl "
            "--engines required --profile batch=1-4,resolution=512-1536") in text
    assert rebuild_command(MANIFEST, "x").startswith("vae-export --model madebyollin/sdxl-vae-fp16-fix")
    # The original choices come back: a rebuilt --fp32-norm decoder-only export must stay so.
    other = {**MANIFEST, "export_options": {**MANIFEST["export_options"], "fp32_norm": True,
                                            "components": ["decoder"], "builder_optimization_level": 5}}
    assert rebuild_command(other, "x").endswith(
        "--components decoder --fp32-norm --profile batch=1-4,resolution=512-1536 --builder-optimization-level 5")


def test_rebuild_command_edge_cases():
    folder = {**MANIFEST, "source": {"kind": "folder", "model": "/data/vaes/my-vae"},
              "export_options": {**MANIFEST["export_options"], "model": "./my-vae", "workspace_gib": None}}
    text = rebuild_command(folder, "out")
    assert "--model /data/vaes/my-vae" in text and "--workspace" not in text
    legacy = {k: v for k, v in MANIFEST.items() if k != "export_options"}  # written before export_options
    assert rebuild_command(legacy, "out").endswith("--profile batch=1-4,resolution=512-1536")


def test_components_parsing():
    from trtvae.components import parse_components

    assert parse_components("decoder,decoder, encoder") == ("decoder", "encoder")
    assert parse_components(("encoder",)) == ("encoder",)
    for bad in ("", "decoder,unet", ("decoder", None)):
        with pytest.raises(OptionError, match="--components"):
            parse_components(bad)


def test_export_options_reach_the_manifest(tiny_fp16):
    from trtvae.manifest import read_manifest

    opts = read_manifest(tiny_fp16)["export_options"]
    assert opts["precision"] == "fp16" and opts["components"] == ["decoder", "encoder"]
    assert opts["profiles"] == ["batch=1-4,resolution=512-1536"] and opts["rescale"] is True


# --- contexts shared between threads ---------------------------------------------------------
def test_context_pool_one_context_per_key_never_used_concurrently():
    made = []
    active: dict = {}
    overlaps = []
    guard = threading.Lock()

    def factory(key):
        made.append(key)
        return object()

    pool = ContextPool(factory)

    def worker(key):
        for _ in range(20):
            with pool.acquire(key) as ctx:
                with guard:
                    active[id(ctx)] = active.get(id(ctx), 0) + 1
                    if active[id(ctx)] > 1:
                        overlaps.append(key)
                time.sleep(0.0005)
                with guard:
                    active[id(ctx)] -= 1

    threads = [threading.Thread(target=worker, args=(("decoder", i % 2),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert sorted(made) == [("decoder", 0), ("decoder", 1)]
    assert len(pool) == 2


# --- degradation without TensorRT ------------------------------------------------------------
@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")
def test_trtvae_without_tensorrt_names_the_package(tiny_fp32):
    import trtvae
    from trtvae import TRTVae

    assert trtvae.OrtVae is not None  # the ONNX Runtime path never needs TensorRT
    with pytest.raises(ImportError, match="pip install tensorrt"):
        TRTVae.from_pretrained(tiny_fp32)


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")
def test_export_says_in_one_line_which_engines_were_not_built(tmp_path, tiny_dir, capsys):
    from trtvae.export.pipeline import ExportOptions, run_export

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


# --- the backend hooks the shared base uses ----------------------------------------------------
class _RecordingVae:
    """OrtVae with a profile-like batch limit, recording what each backend call received."""

    @staticmethod
    def make(directory, limit):
        from trtvae import OrtVae

        class Limited(OrtVae):
            calls: list = []

            def _batch_ranges(self, component, shape):
                return [(1, limit)]

            def _run(self, component, x):
                self.calls.append(tuple(x.shape))
                return super()._run(component, x)

        vae = Limited.from_pretrained(directory)
        vae.calls = []
        return vae


def test_batches_below_the_profile_min_are_padded(tiny_fp32):
    from trtvae import OrtVae

    class MinTwo(OrtVae):
        calls: list = []

        def _batch_ranges(self, component, shape):
            return [(2, 4)]

        def _run(self, component, x):
            self.calls.append(x.shape[0])
            return super()._run(component, x)

    vae = MinTwo.from_pretrained(tiny_fp32)
    z = torch.randn(5, 4, 6, 8)
    out = vae.decode(z).sample
    assert vae.calls == [4, 2]  # 4, then the last image padded to the min batch of 2
    assert out.shape[0] == 5
    assert torch.allclose(out, OrtVae.from_pretrained(tiny_fp32).decode(z).sample, atol=1e-5)
    vae.calls.clear()
    assert vae.decode(z[:1]).sample.shape[0] == 1 and vae.calls == [2]


def test_batch_plans_fit_one_profile_each():
    from trtvae.runtime.tiling import plan_batches

    assert plan_batches(5, [(1, 4)]) == [(4, 4), (1, 1)]
    assert plan_batches(5, [(2, 4)]) == [(4, 4), (1, 2)]
    assert plan_batches(1, [(2, 4)]) == [(1, 2)]
    # Non-overlapping profiles: 4 fits neither 1-2 nor 8-16, so it runs as 2 + 2.
    assert plan_batches(4, [(1, 2), (8, 16)]) == [(2, 2), (2, 2)]
    assert plan_batches(20, [(1, 2), (8, 16)]) == [(16, 16), (2, 2), (2, 2)]
    assert plan_batches(3, [(1, 8)]) == [(3, 3)]
    profiles = [{"min": [1, 4, 8, 8], "max": [2, 4, 32, 32]}, {"min": [8, 4, 8, 8], "max": [16, 4, 32, 32]},
                {"min": [1, 4, 64, 64], "max": [1, 4, 64, 64]}]
    assert batch_ranges(profiles, (4, 4, 16, 16)) == [(1, 2), (8, 16)]


def test_batches_over_the_profile_max_are_split(tiny_fp32):
    from trtvae import OrtVae

    vae = _RecordingVae.make(tiny_fp32, limit=2)
    z = torch.randn(5, 4, 6, 8)
    split = vae.decode(z).sample
    assert [c[0] for c in vae.calls] == [2, 2, 1]
    whole = OrtVae.from_pretrained(tiny_fp32).decode(z).sample
    assert torch.allclose(split, whole, atol=1e-5)


def test_shape_outside_every_profile_names_the_ranges(tiny_fp32):
    from trtvae.manifest import read_manifest
    from trtvae.runtime.base import VaeRuntime
    from trtvae.runtime.trt import TRTVae

    vae = TRTVae.__new__(TRTVae)  # no TensorRT here: exercise the profile logic only
    VaeRuntime.__init__(vae, tiny_fp32, read_manifest(tiny_fp32))
    vae._profiles = {"decoder": [{"min": [1, 4, 8, 8], "opt": [1, 4, 16, 16], "max": [2, 4, 32, 32]}]}
    with pytest.raises(ValueError, match=r"shape \(1, 4, 64, 64\) is outside every engine profile "
                                         r"\(#0: min \[1, 4, 8, 8\] max \[2, 4, 32, 32\]\)"):
        vae._run("decoder", torch.zeros(1, 4, 64, 64, dtype=torch.float32))
    assert vae._batch_ranges("decoder", (9, 4, 16, 16)) == [(1, 2)]
    assert vae._spatial_limits("decoder") == ((8, 8), (32, 32))


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_engine_build_and_decode_on_gpu(tmp_path, tiny_dir):
    from trtvae import TRTVae
    from trtvae.export.pipeline import ExportOptions, run_export

    out = run_export(ExportOptions(model=str(tiny_dir), precision="fp16", out=tmp_path / "e", engines="required",
                                   batch="1-2", resolution="16-64", opt=32))
    vae = TRTVae.from_pretrained(out)
    image = vae.decode(torch.randn(2, 4, 12, 20, device="cuda")).sample
    assert image.shape == (2, 3, 24, 40) and image.is_cuda and torch.isfinite(image).all()


def test_context_pool_bound_drops_least_recently_used_idle_contexts():
    made, dropped = [], []
    pool = ContextPool(lambda key: made.append(key) or key, max_items=2, on_evict=dropped.append)
    for key in ("a", "b", "a", "c"):  # "b" is least recently used when "c" arrives
        with pool.acquire(key):
            pass
    assert len(pool) == 2
    with pool.acquire("a"):
        pass
    assert made == ["a", "b", "c"]  # "a" was kept, so not made again
    with pool.acquire("b"):
        pass
    assert made == ["a", "b", "c", "b"]  # "b" had been dropped
    assert dropped[:1] == ["b"]  # and was handed to on_evict (the GPU slot waits for its stream there)
    # A context in use is never dropped, even past the bound.
    with pool.acquire("x"):
        with pool.acquire("y"):
            with pool.acquire("z"):
                assert len(pool) == 3


# --- the post-build precision check, on inspector output shaped as TensorRT writes it ------------
class _FakeEngine:
    """Just enough of ICudaEngine for check_engine_precision: a context and an inspector's JSON."""

    def __init__(self, layers):
        self.layers = layers

    def create_execution_context(self):
        return type("Ctx", (), {"set_input_shape": lambda self, name, shape: name == "latent_sample"})()

    def create_engine_inspector(self):
        import json

        layers = self.layers
        return type("Insp", (), {"execution_context": None,
                                 "get_engine_information": lambda self, fmt: json.dumps({"Layers": layers})})()


_FAKE_TRT = type("trt", (), {"LayerInformationFormat": type("F", (), {"JSON": 1})})
_IO16 = [{"name": "latent_sample", "dtype": "HALF"}, {"name": "sample", "dtype": "HALF"}]


def test_layer_precision_reads_the_inspectors_formats():
    from trtvae.export.engine import layer_precision

    assert layer_precision("Row major linear FP16 format") == "fp16"
    assert layer_precision("Half") == "fp16"
    assert layer_precision("Channel major FP32 format where channel % 4 == 0") == "fp32"
    assert layer_precision("Float") == "fp32"
    assert layer_precision("BFloat16") == "bf16"
    assert layer_precision("N/A due to dynamic shapes") is None


def test_engine_precision_check_catches_fp32_convolutions():
    from trtvae.errors import ExportError
    from trtvae.export.engine import check_engine_precision

    fp16_layers = [
        {"Name": "conv_in", "LayerType": "CaskConvolution", "Weights": {"Type": "Half"}},
        {"Name": "up.conv", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Row major FP16"}]},
        {"Name": "__myl_ConvAddMul", "LayerType": "kgen", "Metadata": "[ONNX Layer: node_Conv_12]",
         "Weights": {"Type": "Half"}},
        # A fused region naming a conv whose output is an fp32-norm Cast: not judged by that output.
        {"Name": "__myl_CastConvNorm", "LayerType": "kgen", "Metadata": "[ONNX Layer: node_conv2d_3]",
         "Outputs": [{"Format/Datatype": "Float"}]},
        {"Name": "softmax", "LayerType": "Softmax", "Outputs": [{"Format/Datatype": "Float"}]},
    ]
    spec = SPECS["decoder"]
    counts = check_engine_precision(_FAKE_TRT, _FakeEngine(fp16_layers), _IO16, "fp16", spec, [1, 4, 8, 8])
    assert counts == {"fp16": 3, "unknown": 1}
    fp32_layers = fp16_layers + [{"Name": "conv_out", "LayerType": "CaskConvolution", "Weights": {"Type": "Float"}}]
    with pytest.raises(ExportError, match="1 convolution layers are not fp16, e.g. conv_out"):
        check_engine_precision(_FAKE_TRT, _FakeEngine(fp32_layers), _IO16, "fp16", spec, [1, 4, 8, 8])
    with pytest.raises(ExportError, match="I/O is"):
        check_engine_precision(_FAKE_TRT, _FakeEngine(fp16_layers), [{"name": "latent_sample", "dtype": "FLOAT"}],
                               "fp16", spec, [1, 4, 8, 8])
