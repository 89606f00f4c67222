"""The export's engine stage where TensorRT is absent, and the post-build precision check on inspector-shaped JSON."""
from __future__ import annotations

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


# --- the post-build precision check, on inspector output shaped as TensorRT writes it ------------
class _FakeEngine:
    """Just enough of ICudaEngine for check_engine_precision: a context and an inspector's JSON."""

    def __init__(self, layers, context=True):
        self.layers = layers
        self.context = context
        self.strategies = []

    def create_execution_context(self, strategy="DEFAULT"):
        self.strategies.append(strategy)
        if not self.context:
            return None  # what the bindings return when TensorRT cannot allocate
        return type("Ctx", (), {"set_input_shape": lambda self, name, shape: name == "latent_sample"})()

    def create_engine_inspector(self):
        import json

        layers = self.layers
        return type("Insp", (), {"execution_context": None,
                                 "get_engine_information": lambda self, fmt: json.dumps({"Layers": layers})})()


_FAKE_TRT = type("trt", (), {"LayerInformationFormat": type("F", (), {"JSON": 1}),
                             "ExecutionContextAllocationStrategy": type("S", (), {"USER_MANAGED": "USER_MANAGED"})})
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


# --- issue 11 -----------------------------------------------------------------------------------
def _as_trt11(layers):
    """The same layers as TensorRT 11 writes them: "Datatype" and "Format" apart, weights under "Constants"."""
    out = []
    for layer in layers:
        layer = dict(layer)
        if "Weights" in layer:
            layer["Constants"] = [{"Name": f"{layer['Name']}.weight", "Datatype": layer.pop("Weights")["Type"]}]
        if "Outputs" in layer:
            layer["Outputs"] = [{"Name": "t", "Datatype": o["Format/Datatype"].split()[-1]
                                 if "FP16" in o["Format/Datatype"] else o["Format/Datatype"], "Format": "Row major"}
                                for o in layer["Outputs"]]
        out.append(layer)
    return out


_LAYERS_16 = [
    {"Name": "conv_in", "LayerType": "CaskConvolution", "Weights": {"Type": "Half"}},
    {"Name": "up.conv", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Row major FP16"}]},
    {"Name": "__myl_ConvAddMul", "LayerType": "kgen", "Metadata": "[ONNX Layer: node_Conv_12]",
     "Weights": {"Type": "Half"}},
    {"Name": "softmax", "LayerType": "Softmax", "Outputs": [{"Format/Datatype": "Float"}]},
]


@pytest.mark.parametrize("layout", ["10.x", "11.x"])
def test_engine_precision_check_reads_both_inspector_layouts(layout):
    from trtvae.errors import ExportError
    from trtvae.export.engine import check_engine_precision

    convert = _as_trt11 if layout == "11.x" else list
    spec = SPECS["decoder"]
    counts = check_engine_precision(_FAKE_TRT, _FakeEngine(convert(_LAYERS_16)), _IO16, "fp16", spec, [1, 4, 8, 8])
    assert counts == {"fp16": 3}
    for bad in ({"Name": "conv_out", "LayerType": "CaskConvolution", "Weights": {"Type": "Float"}},
                {"Name": "conv_out", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Float"}]}):
        with pytest.raises(ExportError, match="1 convolution layers are not fp16, e.g. conv_out"):
            check_engine_precision(_FAKE_TRT, _FakeEngine(convert(_LAYERS_16 + [bad])), _IO16, "fp16", spec,
                                   [1, 4, 8, 8])
    if layout == "11.x":  # the split layout as such, not only the converted one
        layer = {"Name": "c", "LayerType": "CaskConvolution", "Outputs": [{"Datatype": "Float", "Format": "Linear"}]}
        with pytest.raises(ExportError, match="e.g. c"):
            check_engine_precision(_FAKE_TRT, _FakeEngine([layer]), _IO16, "fp16", spec, [1, 4, 8, 8])
        # fp16 weights with a wider bias beside them: a correct engine, never rejected.
        mixed = {"Name": "m", "LayerType": "CaskConvolution",
                 "Constants": [{"Name": "w", "Datatype": "Half"}, {"Name": "b", "Datatype": "Float"}]}
        assert check_engine_precision(_FAKE_TRT, _FakeEngine([mixed]), _IO16, "fp16", spec, [1, 4, 8, 8]) == \
            {"fp16": 1}


def test_weight_and_format_readers():
    from trtvae.export.engine import tensor_format, weight_precisions

    assert tensor_format({"Format/Datatype": "Row major linear FP16 format"}) == "Row major linear FP16 format"
    assert tensor_format({"Datatype": "Half", "Format": "Row major linear"}) == "Half Row major linear"
    assert tensor_format("N/A") == "" and tensor_format({}) == ""
    assert weight_precisions({"Weights": {"Type": "Half"}}) == {"fp16"}
    assert weight_precisions({"Constants": [{"Datatype": "Float"}, {"Format/Datatype": "Half"}]}) == {"fp32", "fp16"}
    assert weight_precisions({"Constants": {"weight": {"Datatype": "BFloat16"}}}) == {"bf16"}
    assert weight_precisions({"Constants": {"Name": "w", "Datatype": "Half"}}) == {"fp16"}
    assert weight_precisions({"Constants": "nonsense", "Weights": "x"}) == set()  # unknown stays unknown


def test_inspector_context_is_user_managed_and_its_absence_is_an_error():
    from trtvae.errors import ExportError
    from trtvae.export.engine import check_engine_precision

    engine = _FakeEngine(_LAYERS_16)
    check_engine_precision(_FAKE_TRT, engine, _IO16, "fp16", SPECS["decoder"], [1, 4, 8, 8])
    assert engine.strategies == ["USER_MANAGED"]
    with pytest.raises(ExportError, match="could not create an execution context to inspect the decoder engine"):
        check_engine_precision(_FAKE_TRT, _FakeEngine(_LAYERS_16, context=False), _IO16, "fp16", SPECS["decoder"],
                               [1, 4, 8, 8])


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
    trt.Logger = type("Logger", (), {"ERROR": 1, "__init__": lambda self, severity: None})
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
    _fake_tensorrt(monkeypatch, lambda logger: object())
    assert engines_unavailable_reason() is None


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
