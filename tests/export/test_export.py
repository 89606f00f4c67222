"""The exported graphs: names, symbolic dims, dtypes, plain ai.onnx, manifest contents, atomic re-export."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trtvae.errors import ExportError, VerificationError
from trtvae.export.options import ExportOptions
from trtvae.export.run import run_export
from trtvae.files import sha256_file
from trtvae.manifest import MANIFEST_NAME, read_manifest


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("precision,elem", [("fp32", onnx.TensorProto.FLOAT), ("fp16", onnx.TensorProto.FLOAT16)])
def test_graph_io_is_symbolic_and_typed(request, precision, elem):
    out = request.getfixturevalue(f"tiny_{precision}")
    dec = onnx.load(out / "decoder.onnx")
    enc = onnx.load(out / "encoder.onnx")
    # Tiny VAE: two blocks, spatial factor 2.
    assert [v.name for v in dec.graph.input] == ["latent_sample"]
    assert [v.name for v in dec.graph.output] == ["sample"]
    assert _dims(dec.graph.input[0]) == ["batch", 4, "latent_height", "latent_width"]
    assert _dims(dec.graph.output[0]) == ["batch", 3, "2*latent_height", "2*latent_width"]
    assert [v.name for v in enc.graph.input] == ["sample"]
    assert [v.name for v in enc.graph.output] == ["latent_parameters"]
    assert _dims(enc.graph.input[0]) == ["batch", 3, "2*latent_height", "2*latent_width"]
    assert _dims(enc.graph.output[0]) == ["batch", 8, "latent_height", "latent_width"]
    for model in (dec, enc):
        assert model.graph.input[0].type.tensor_type.elem_type == elem
        assert {n.domain for n in model.graph.node} <= {""}
        assert [o.version for o in model.opset_import if o.domain == ""] == [18]
        onnx.checker.check_model(model)


def test_graph_runs_at_shapes_other_than_the_export_example(tiny_fp32):
    """The example was batch 2 at 4×6 latents: 1, 3 and odd/non-square sizes must run too."""
    session = ort.InferenceSession(str(tiny_fp32 / "decoder.onnx"), providers=["CPUExecutionProvider"])
    # Batch 70: beyond the bound torch.export was given (see onnx_export._dynamic_shapes).
    for shape in [(1, 4, 5, 9), (3, 4, 7, 7), (1, 4, 1, 1), (70, 4, 2, 3)]:
        y = session.run(None, {"latent_sample": np.random.randn(*shape).astype(np.float32)})[0]
        assert y.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])


def test_manifest_contract(tiny_fp16):
    m = json.loads((tiny_fp16 / MANIFEST_NAME).read_text())
    assert m["format"] == "trtvae" and m["schema_version"] == 1
    assert m["precision"] == "fp16" and m["io_dtype"] == "float16"
    assert m["spatial_factor"] == 2
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "block_out_channels",
                "latent_channels"):
        assert key in m["vae_config"]
    assert m["vae_config"]["force_upcast"] is False
    assert m["source"]["kind"] == "folder"
    assert len(m["source"]["weights_sha256"]) == 64
    for key in ("torch", "diffusers", "onnx"):
        assert m["versions"][key]
    for name, io in (("decoder", ("latent_sample", "sample")), ("encoder", ("sample", "latent_parameters"))):
        c = m["components"][name]
        assert c["onnx"] == f"{name}.onnx"
        assert c["sha256"] == sha256_file(tiny_fp16 / c["onnx"])
        assert c["precision"] == "fp16" and c["opset"] == 18
        assert [v["name"] for v in c["inputs"]] == [io[0]]
        assert [v["name"] for v in c["outputs"]] == [io[1]]
        assert c["inputs"][0]["dtype"] == "float16"
        assert c["inputs"][0]["shape"][0] == "batch"
    assert m["verify"]["status"] == "passed"
    assert all(check["ok"] for check in m["verify"]["checks"])


def test_manifest_weights_hash_is_the_source_file(tiny_dir, tiny_fp32):
    m = read_manifest(tiny_fp32)
    assert m["source"]["weights_sha256"] == sha256_file(tiny_dir / m["source"]["weights_file"])


def test_interrupted_reexport_leaves_the_old_export(tmp_path, tiny_dir, monkeypatch):
    out = tmp_path / "out"
    run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=out, verify=False))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import trtvae.export.run as pipeline

    real = pipeline.export_onnx

    def fail_on_encoder(vae, spec, precision, path, **kwargs):
        if spec.name == "encoder":
            raise KeyboardInterrupt
        return real(vae, spec, precision, path, **kwargs)

    monkeypatch.setattr(pipeline, "export_onnx", fail_on_encoder)
    with pytest.raises(KeyboardInterrupt):
        run_export(ExportOptions(model=str(tiny_dir), precision="fp16", out=out, verify=False))
    # The new export was staged beside the folder and removed; the old one is untouched and loads.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    from trtvae import OrtVae

    assert OrtVae.from_pretrained(out).manifest["precision"] == "fp32"


def test_reexport_removes_stale_files(tmp_path, tiny_dir):
    out = tmp_path / "out"
    run_export(ExportOptions(model=str(tiny_dir), precision="fp16", out=out))
    assert (out / "verify_decoder.png").exists() and (out / "fp16_audit.json").exists()
    (out / "timing.cache").write_bytes(b"kept across exports")
    run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=out, verify=False, components=("decoder",)))
    m = read_manifest(out)
    assert sorted(m["components"]) == ["decoder"]
    assert m["files"] == ["decoder.onnx"]
    # Last export's encoder, audit and verify picture would describe another graph: all gone.
    for name in ("encoder.onnx", "verify_decoder.png", "fp16_audit.json"):
        assert not (out / name).exists(), name
    assert (out / "timing.cache").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(precision="fp32", fp32_norm=True), "--fp32-norm applies to fp16 graphs"),
    (dict(profile=("batch=1",), batch="1-2"), "--profile replaces"),
    (dict(static="512x512", opt=512), "--static fixes one size"),
    (dict(resolution="500-1536"), "500 px is not a multiple of the VAE's spatial factor 8"),
])
def test_inconsistent_options_are_refused_before_any_work(tmp_path, kwargs, message):
    from trtvae.errors import OptionError

    with pytest.raises(OptionError, match=message):
        run_export(ExportOptions(model="demo", out=tmp_path / "o", **kwargs))
    assert not (tmp_path / "o").exists()


def test_failed_verification_writes_no_manifest(tmp_path, tiny_dir, monkeypatch):
    import trtvae.metrics as metrics

    monkeypatch.setitem(metrics.REL_L2_THRESHOLD, "fp16", 1e-9)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="accuracy check"):
        run_export(ExportOptions(model=str(tiny_dir), precision="fp16", out=out))
    assert not (out / MANIFEST_NAME).exists()


def test_bf16_export_types_the_graph_and_says_verify_did_not_run(tmp_path, tiny_dir):
    out = run_export(ExportOptions(model=str(tiny_dir), precision="bf16", out=tmp_path / "bf16",
                                   components=("decoder",)))
    m = read_manifest(out)
    assert m["io_dtype"] == "bfloat16" and m["components"]["decoder"]["opset"] == 22
    assert m["components"]["decoder"]["inputs"][0]["dtype"] == "bfloat16"
    assert m["verify"]["status"] == "not_run" and "bf16" in m["verify"]["reason"]


def test_check_graph_rejects_a_specialized_dim(tiny_fp32):
    from trtvae.components import component_specs
    from trtvae.export.onnx_export import check_graph

    model = onnx.load(tiny_fp32 / "decoder.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # batch frozen to 2
    specs = component_specs(read_manifest(tiny_fp32)["vae_config"])
    with pytest.raises(ExportError, match="symbolic"):
        check_graph(model, specs["decoder"], "fp32")


def test_a_folder_that_is_not_an_export_is_never_cleaned(tmp_path, tiny_dir):
    from trtvae.errors import OptionError

    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "encoder.onnx").write_bytes(b"someone else's model")
    with pytest.raises(OptionError, match="is not a trtvae export folder"):
        run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=foreign, verify=False))
    assert (foreign / "encoder.onnx").read_bytes() == b"someone else's model"


def test_old_manifest_cannot_delete_outside_the_folder(tmp_path, tiny_dir):
    out = tmp_path / "out"
    run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=out, verify=False, components=("decoder",)))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["files"] = ["decoder.onnx", "../victim.txt"]
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=out, verify=False, components=("decoder",)))
    assert victim.read_text() == "keep"
