"""Everything around TRTVae's TensorRT calls that can be decided without TensorRT or a GPU."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import HAS_TRT

from trtvae.profiles import batch_ranges
from trtvae.runtime.engine_check import EngineMismatchError, check_engine, engine_mismatches, rebuild_command
from trtvae.runtime.trt import ContextPool, TRTVae


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


def test_cuda_graphs_is_an_unknown_argument(tiny_fp32):
    # There are no CUDA graphs: the option is refused like any misspelt one, before TensorRT is needed,
    # and attach() does not swallow it into a fallback to ONNX Runtime.
    from trtvae import attach

    with pytest.raises(TypeError, match="cuda_graphs"):
        TRTVae.from_pretrained(tiny_fp32, cuda_graphs=True)
    with pytest.raises(TypeError, match="graph_memory_bytes"):
        TRTVae.from_pretrained(tiny_fp32, graph_memory_bytes=2**30)

    class Pipe:
        vae = None

    with pytest.raises(TypeError, match="cuda_graphs"):
        attach(Pipe(), tiny_fp32, verbose=False, trt_options={"cuda_graphs": True})


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
    from trtvae.runtime.batching import plan_batches

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

    vae = TRTVae.__new__(TRTVae)  # no TensorRT here: exercise the profile logic only
    VaeRuntime.__init__(vae, tiny_fp32, read_manifest(tiny_fp32))
    vae.profiles = {"decoder": [{"min": [1, 4, 8, 8], "opt": [1, 4, 16, 16], "max": [2, 4, 32, 32]}]}
    with pytest.raises(ValueError, match=r"shape \(1, 4, 64, 64\) is outside every engine profile "
                                         r"\(#0: min \[1, 4, 8, 8\] max \[2, 4, 32, 32\]\)"):
        vae._run("decoder", torch.zeros(1, 4, 64, 64, dtype=torch.float32))
    assert vae._batch_ranges("decoder", (9, 4, 16, 16)) == [(1, 2)]
    assert vae._spatial_limits("decoder") == ((8, 8), (32, 32))


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_engine_build_and_decode_on_gpu(tmp_path, tiny_dir):
    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    out = run_export(ExportOptions(model=str(tiny_dir), precision="fp16", out=tmp_path / "e", engines="required",
                                   batch="1-2", resolution="16-64", opt=32))
    vae = TRTVae.from_pretrained(out)
    image = vae.decode(torch.randn(2, 4, 12, 20, device="cuda")).sample
    assert image.shape == (2, 3, 24, 40) and image.is_cuda and torch.isfinite(image).all()

    # Offset views (a batch split beyond the profile max, slicing) reach TensorRT at aligned addresses.
    z = torch.randn(3, 4, 12, 20, device="cuda")
    whole = torch.cat([vae.decode(z[i:i + 1]).sample for i in range(3)])
    assert torch.allclose(vae.decode(z).sample, whole, atol=2e-3)  # batch 3 > profile max 2: split
    vae.enable_slicing()
    assert torch.allclose(vae.decode(z[:2]).sample, whole[:2], atol=2e-3)
    vae.disable_slicing()
    assert len(vae._pool) == 1  # one context for the decoder's one profile, whatever the shapes


# --- what TensorRT needs of the tensors it is handed by address ---------------------------------
def test_offset_views_are_copied_to_256_byte_aligned_memory():
    from trtvae.runtime.alignment import ALIGNMENT, aligned, aligned_empty, is_aligned

    for dtype in (torch.float16, torch.float32):
        for shape in ((1,), (3, 4, 100, 100), (2, 3, 17, 5)):
            t = aligned_empty(shape, dtype, "cpu")  # the CPU allocator only promises 64
            assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and is_aligned(t)
    batch = aligned(torch.randn(3, 4, 100, 100).half())
    assert is_aligned(batch) and aligned(batch) is batch  # aligned input: no copy
    second = batch.split(1)[1]  # slicing under enable_slicing
    assert second.data_ptr() - batch.data_ptr() == 80000 and 80000 % ALIGNMENT == 128
    assert not is_aligned(second)
    copy = aligned(second)
    assert is_aligned(copy) and torch.equal(copy, second) and copy.data_ptr() != second.data_ptr()
    chunk = batch[1:3]  # a batch chunk beyond the profile max
    assert not is_aligned(chunk) and is_aligned(aligned(chunk)) and torch.equal(aligned(chunk), chunk)
    strided = batch.transpose(2, 3)  # aligned start but not contiguous: TensorRT reads it as dense
    assert is_aligned(strided) and aligned(strided).is_contiguous() and torch.equal(aligned(strided), strided)
