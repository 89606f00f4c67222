"""Served models tile large requests exactly (segment graphs), never with diffusers' blend tiling.

One `vae-export serve --tile 8` on the tiny fp32 export (spatial factor 2: latents above 4×4 are tiled)
against the real Triton server; the rest in-process on `ServedModel`, which the Python backend runs.
"""
from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import pytest
import torch

from trtvae import OrtVae
from trtvae.cli import main
from trtvae.manifest import ManifestError, read_manifest
from trtvae.serving.models import ServedModel, model_decls

TILE = 8  # image pixels: the tiny VAE's latents are tiled above 4×4


def _rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def _ort(export, tile=None, mode=None) -> OrtVae:
    vae = OrtVae.from_pretrained(export)
    if tile is not None:
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // vae.spatial_factor
        vae.enable_tiling(mode=mode)
    return vae


@pytest.fixture(scope="module")
def server(tiny_fp32):
    pytest.importorskip("pytriton", reason="needs the triton extra: pip install -e '.[triton]'")
    from triton_helpers import serve_ready

    info = serve_ready(tiny_fp32, "--tile", TILE, "--instances", "1", "--max-batch", "2")
    yield info | {"grpc": f"127.0.0.1:{info['ports'][1]}"}
    if info["proc"].poll() is None:
        info["proc"].send_signal(signal.SIGINT)
        info["proc"].wait(timeout=60)


def test_serve_decodes_and_encodes_a_large_image_exactly(server, tiny_fp32):
    import tritonclient.grpc as grpc
    from triton_helpers import infer

    assert f"tiling: exact above {TILE} px a side" in server["banner"]
    z = np.random.default_rng(1).standard_normal((2, 4, 13, 10)).astype(np.float32)  # 26×20 px: 4×3 tiles
    served = infer(grpc, server["grpc"], "vae_decoder", "latent_sample", z, "sample")
    untiled = _ort(tiny_fp32).decode(torch.from_numpy(z)).sample.numpy()
    exact = _ort(tiny_fp32, TILE, "exact").decode(torch.from_numpy(z)).sample.numpy()
    blend = _ort(tiny_fp32, TILE, "blend").decode(torch.from_numpy(z)).sample.numpy()
    assert served.shape == (2, 3, 26, 20)
    assert _rel(served, untiled) <= 1e-5  # the untiled image ...
    np.testing.assert_array_equal(served, exact)  # ... reached through the segment graphs, not one run:
    assert not np.array_equal(served, untiled)  # the tiled sums round differently in the last bits
    assert _rel(blend, untiled) > 1e-3  # what blend tiling would have answered
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 22, 18)).astype(np.float32)
    params = infer(grpc, server["grpc"], "vae_encoder", "sample", x, "latent_parameters")
    untiled = _ort(tiny_fp32).encode(torch.from_numpy(x)).latent_dist.parameters.numpy()
    assert _rel(params, untiled) <= 1e-5
    np.testing.assert_array_equal(params, _ort(tiny_fp32, TILE, "exact").encode(torch.from_numpy(x))
                                  .latent_dist.parameters.numpy())


def test_serve_runs_requests_at_the_tile_untiled(server, tiny_fp32):
    import tritonclient.grpc as grpc
    from triton_helpers import infer

    z = np.random.default_rng(3).standard_normal((1, 4, 4, 4)).astype(np.float32)  # 8×8 px: the tile itself
    served = infer(grpc, server["grpc"], "vae_decoder", "latent_sample", z, "sample")
    np.testing.assert_array_equal(served, _ort(tiny_fp32).decode(torch.from_numpy(z)).sample.numpy())


# --- in-process: what each served model does with its tile ------------------------------------------------
def _decoder(export, tile):
    decl = next(d for d in model_decls(read_manifest(export), "vae") if d.kind == "decoder")
    return ServedModel(decl, OrtVae.from_pretrained(export), tile)


def test_default_tile_is_the_models_sample_size_and_zero_turns_it_off(tiny_fp32):
    model = _decoder(tiny_fp32, None)
    assert model.runtime.use_tiling and model.runtime.tiling_mode == "exact"
    assert model.runtime.tile_sample_min_size == 32 and model.runtime.tile_latent_min_size == 16  # TINY_CONFIG
    assert model.tiling.startswith("exact above 32 px")
    off = _decoder(tiny_fp32, 0)
    assert not off.runtime.use_tiling and off.tiling.startswith("off")


def test_export_without_segments_is_served_untiled_never_blended(tiny_fp32, tmp_path):
    folder = tmp_path / "noseg"
    shutil.copytree(tiny_fp32, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["components"].values():
        del entry["segments"]  # as an export with --no-segments (or an older trtvae) writes it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    model = _decoder(folder, TILE)
    assert not model.runtime.use_tiling
    assert "holds no decoder segment graphs" in model.tiling and "run untiled" in model.tiling
    z = np.random.default_rng(4).standard_normal((1, 4, 9, 7)).astype(np.float32)
    np.testing.assert_array_equal(model.run(z), _ort(tiny_fp32).decode(torch.from_numpy(z)).sample.numpy())


def test_warm_up_loads_the_segment_graphs_so_a_changed_one_fails_the_load(tiny_fp32, tmp_path):
    folder = tmp_path / "changed"
    shutil.copytree(tiny_fp32, folder)
    step = read_manifest(folder)["components"]["decoder"]["segments"]["steps"][-1]
    with open(folder / step["file"], "ab") as f:
        f.write(b"\0")
    model = _decoder(folder, TILE)
    with pytest.raises(ManifestError, match=step["file"]):
        model.warm_up()
    assert _decoder(tiny_fp32, TILE).warm_up() == (1, 4, 1, 1)


@pytest.mark.parametrize("argv,code,message", [
    (["serve", "{export}", "--tile", "7"], 1, "error: --tile 7: expected 0 (no tiling) or the tile side in image "
                                              "pixels, a positive multiple of 2"),
    (["serve", "{export}", "--tile", "-8"], 2, "argument --tile: '-8': expected 0 (no tiling)"),
    (["triton", "{export}", "--repo", "{repo}", "--tile", "big", "--backend", "python"], 2, "argument --tile: 'big'"),
    (["triton", "{export}", "--repo", "{repo}", "--tile", "16", "--backend", "onnx"], 1,
     "error: --tile 16: only --backend python tiles"),
], ids=["serve-not-multiple", "serve-negative", "triton-not-a-number", "triton-native"])
def test_bad_tile_is_one_error_line_naming_the_flag(tiny_fp32, tmp_path, capsys, argv, code, message):
    argv = [a.format(export=tiny_fp32, repo=tmp_path / "repo") for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].count("error") == 1, err
    assert not (tmp_path / "repo").exists()
