"""The export's engine stage where TensorRT is absent, and the post-build precision check on inspector-shaped JSON."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from trtvae.components import component_specs
from trtvae.errors import OptionError

SPECS = component_specs({"block_out_channels": [128, 256, 512, 512], "latent_channels": 4})

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


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
