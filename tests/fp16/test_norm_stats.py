"""GroupNorm statistics are judged: a variance above 65504 keeps them in fp32 without being asked.

TensorRT documents no fp32 accumulation for an fp16 normalization in a strongly typed network
(docs/fp16-safety.md), so the export decides from the audit's `norm_var_max`. The plant scales
`decoder.conv_in` directly: × 2^9 puts the decoder's GroupNorm variances near 1.5e5 while every
activation stays below 2000 (fp16 safe); × 2^8 keeps the variances near 3.7e4.
"""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from conftest import make_tiny_vae
from trtvae.export.fp16.audit import AuditResult, LayerStat, audit_model
from trtvae.export.fp16.decide import needs_fp32_norm, norms_over_limit
from trtvae.export.fp16.report import verdict_line
from trtvae.export.fp16.safety import make_fp16_safe
from trtvae.export.options import ExportOptions
from trtvae.export.run import run_export
from trtvae.manifest import MANIFEST_NAME


def _planted(exponent: int):
    vae = make_tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(2.0 ** exponent)
        vae.decoder.conv_in.bias.mul_(2.0 ** exponent)
    return vae


def _norm(name, var):
    return LayerStat(name, "decoder", "norm", max_abs=1.0, input_max_abs=1.0, norm_sq_max=var, norm_var_max=var)


def test_the_limit_is_fp16s_largest_value():
    audit = AuditResult([_norm("a", 65504.0), _norm("b", 65505.0), _norm("c", 3e6), LayerStat("conv", "decoder",
                                                                                               "conv", 9.0)], [])
    assert [s.name for s in norms_over_limit(audit)] == ["c", "b"]
    assert needs_fp32_norm(audit).startswith("GroupNorm variance 3e+06 at c (and 1 more) exceeds 65504")
    assert needs_fp32_norm(AuditResult([_norm("a", 65504.0)], [])) is None


@pytest.mark.parametrize("exponent,switched", [(8, False), (9, True)])
def test_a_variance_over_fp16_switches_fp32_statistics_on(exponent, switched, capsys):
    vae = _planted(exponent)
    exported, record = make_fp16_safe(vae, ("decoder",), out=None)
    printed = " ".join(capsys.readouterr().out.split())
    assert record["audit"]["fp16_safe"] is True and record["rescale"] == {"applied": False}
    assert exported is vae
    assert record["fp32_norm"] is switched and record["norm_stats"]["fp32"] is switched
    assert (record["norm_stats"]["var_max"] > 65504) is switched
    said = "an fp16 export keeps GroupNorm statistics in fp32 automatically"
    assert (said in printed) is switched  # in the verdict line
    if switched:
        assert "GroupNorm variance" in record["norm_stats"]["reason"]
        assert said in verdict_line(audit_model(vae, ("decoder",)))


def test_the_export_casts_the_statistics_to_fp32_and_stays_accurate(tmp_path):
    src = tmp_path / "src"
    _planted(9).save_pretrained(src)
    out = tmp_path / "out"
    run_export(ExportOptions(model=str(src), precision="fp16", out=out, engines="skip", components=("decoder",)))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["fp16_safety"]["fp32_norm"] is True and manifest["export_options"]["fp32_norm"] is False
    assert manifest["verify"]["status"] == "passed"
    model = onnx.shape_inference.infer_shapes(onnx.load(out / "decoder.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    assert norms and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
