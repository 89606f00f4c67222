"""SDXL text-to-image, img2img and inpainting give the same images with OrtVae as with the PyTorch VAE.

The pipelines are built here from tiny random configs with no text encoders: prompt embeddings are
passed directly. The tiny VAE has a spatial factor of 2, not SDXL's 8, which also checks that
`trtvae.attach` fixes what a pipeline derived from the VAE it was built with.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("transformers")  # diffusers' SDXL pipelines import it

from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

import trtvae  # noqa: E402
from trtvae import OrtVae  # noqa: E402
from trtvae.metrics import REL_L2_THRESHOLD, compare  # noqa: E402

FP32 = REL_L2_THRESHOLD["fp32"]
TEXT_DIM, POOLED_DIM, TIME_DIM = 32, 32, 8
SIZE = 32  # pixels; latents are 16×16 with the tiny VAE


def make_unet(in_channels: int = 4) -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=TEXT_DIM,
            transformer_layers_per_block=(1, 1),
            # SDXL's micro-conditioning: 6 time ids embedded to TIME_DIM each, plus the pooled text embedding.
            addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED_DIM,
        ).eval().requires_grad_(False)


def make_pipe(cls, vae, unet):
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = cls(vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, text_encoder_2=None,
               tokenizer=None, tokenizer_2=None, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 7, TEXT_DIM, generator=g),
                pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g),
                negative_prompt_embeds=torch.randn(1, 7, TEXT_DIM, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g))


def _image(seed=1, channels=3):
    return torch.rand(1, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _mask():
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 8:24, 4:20] = 1
    return mask


def run(pipe, seed=0, output_type="pt", **kwargs):
    with torch.no_grad():
        return pipe(**_embeds(), num_inference_steps=2, guidance_scale=2.0, height=SIZE, width=SIZE,
                    generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs).images


CASES = {
    "text2img": (StableDiffusionXLPipeline, 4, {}),
    "img2img": (StableDiffusionXLImg2ImgPipeline, 4, {"image": _image(), "strength": 0.7}),
    # A 4-channel UNet encodes the image; a 9-channel (inpainting) UNet also encodes the masked image.
    "inpaint-4ch": (StableDiffusionXLInpaintPipeline, 4, {"image": _image(), "mask_image": _mask(), "strength": 0.8}),
    "inpaint-9ch": (StableDiffusionXLInpaintPipeline, 9, {"image": _image(), "mask_image": _mask(), "strength": 0.8}),
}


@pytest.fixture(scope="module")
def unets():
    return {4: make_unet(4), 9: make_unet(9)}


@pytest.fixture(scope="module")
def torch_vae(tiny_dir):
    return AutoencoderKL.from_pretrained(tiny_dir).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def references(unets, torch_vae):
    return {name: run(make_pipe(cls, torch_vae, unets[ch]), **kw) for name, (cls, ch, kw) in CASES.items()}


def _assert_same_images(ours, theirs):
    stats = compare(ours, theirs)
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
    assert stats.nonfinite == 0 and stats.rel_l2 <= FP32, stats
    assert float(theirs.std()) > 0.01  # a real image, not a constant one that would match anything


@pytest.mark.parametrize("case", list(CASES))
def test_swap_in_two_lines_gives_the_same_images(case, unets, torch_vae, tiny_fp32, references):
    cls, ch, kw = CASES[case]
    pipe = make_pipe(cls, torch_vae, unets[ch])
    pipe.vae = OrtVae.from_pretrained(tiny_fp32)
    _assert_same_images(run(pipe, **kw), references[case])


@pytest.mark.parametrize("case", list(CASES))
def test_attach_to_a_pipeline_built_without_a_vae(case, unets, tiny_fp32, references, capsys):
    cls, ch, kw = CASES[case]
    pipe = make_pipe(cls, None, unets[ch])
    assert pipe.vae_scale_factor == 8  # diffusers' guess without a VAE: wrong for this one
    vae = trtvae.attach(pipe, tiny_fp32)
    assert pipe.vae is vae and pipe.vae_scale_factor == 2
    assert pipe.image_processor.config.vae_scale_factor == 2
    if hasattr(pipe, "mask_processor"):
        assert pipe.mask_processor.config.vae_scale_factor == 2
        assert pipe.mask_processor.config.do_binarize  # the rest of its config is kept
    assert "OrtVae" in capsys.readouterr().out
    _assert_same_images(run(pipe, **kw), references[case])


def test_img2img_latents_follow_the_generator_through_latent_dist(unets, torch_vae, tiny_fp32):
    kw = CASES["img2img"][2]
    ref_pipe = make_pipe(StableDiffusionXLImg2ImgPipeline, torch_vae, unets[4])
    pipe = make_pipe(StableDiffusionXLImg2ImgPipeline, OrtVae.from_pretrained(tiny_fp32), unets[4])
    a, b = run(pipe, seed=5, output_type="latent", **kw), run(ref_pipe, seed=5, output_type="latent", **kw)
    assert compare(a, b).rel_l2 <= FP32
    c = run(pipe, seed=6, output_type="latent", **kw)
    assert compare(a, c).rel_l2 > 1e-2  # another generator, other latents


def test_tiled_vae_in_a_pipeline_matches_diffusers_tiling(unets, tiny_dir, tiny_fp32):
    # 16×16 latents fit one default tile; tiles of 8 latents (16 px) make both encode and decode tiled.
    torch_vae = AutoencoderKL.from_pretrained(tiny_dir).eval().requires_grad_(False)
    ours = OrtVae.from_pretrained(tiny_fp32)
    for vae in (torch_vae, ours):
        vae.tile_latent_min_size, vae.tile_sample_min_size = 8, 16
    torch_vae.enable_tiling()
    ours.enable_tiling(mode="blend")  # diffusers' own tiling, seams included
    cls, ch, kw = CASES["img2img"]
    ref = run(make_pipe(cls, torch_vae, unets[ch]), **kw)
    _assert_same_images(run(make_pipe(cls, ours, unets[ch]), **kw), ref)


def test_module_habits_pipelines_rely_on(tiny_fp32):
    from diffusers.utils.torch_utils import get_module_execution_device

    vae = OrtVae.from_pretrained(tiny_fp32)
    assert vae.to("cpu") is vae  # pipelines chain vae.to(...)
    with pytest.warns(UserWarning, match=r"to\(torch.float16\) is ignored"):
        assert vae.to(torch.float16) is vae
    assert vae.dtype == torch.float32  # the export's precision, not the requested one
    assert vae.config.force_upcast is False and vae.config["latent_channels"] == vae.config.latent_channels == 4
    assert next(iter(vae.post_quant_conv.parameters())).dtype == vae.dtype
    assert get_module_execution_device(vae) == vae.device == torch.device("cpu")


def test_what_a_non_module_vae_cannot_do(unets, tiny_fp32, tmp_path, caplog):
    import json
    import logging

    pipe = make_pipe(StableDiffusionXLPipeline, None, unets[4])
    trtvae.attach(pipe, tiny_fp32, verbose=False)
    pipe.to("cpu")  # skips the VAE (not a Module) without raising
    assert pipe.vae.device.type == "cpu"
    with pytest.raises(ValueError, match="only supported for the VAE of type `AutoencoderKL`"):
        pipe.fuse_qkv_projections()  # vae=True is the default
    # diffusers' loggers do not propagate to the root logger, where caplog listens: listen on theirs.
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            pipe.save_pretrained(tmp_path / "saved")  # saves the rest; the VAE is left out
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("self.vae=") and m.endswith("cannot be saved.") for m in warnings), warnings
    assert not (tmp_path / "saved" / "vae").exists() and (tmp_path / "saved" / "unet").is_dir()
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["vae"] == [None, None]


# --- backend choice ---------------------------------------------------------------------------
def _fake_trt(monkeypatch, behaviour):
    class TRTVae:
        @classmethod
        def from_pretrained(cls, directory, **kwargs):
            return behaviour(directory)

    module = types.ModuleType("trtvae.runtime.trt")
    module.TRTVae = TRTVae
    monkeypatch.setitem(sys.modules, "trtvae.runtime.trt", module)


def _raise(exc):
    def behaviour(directory):
        raise exc
    return behaviour


def test_auto_falls_back_to_onnxruntime_and_says_why(unets, tiny_fp32, monkeypatch, capsys):
    _fake_trt(monkeypatch, _raise(RuntimeError("no CUDA GPU visible")))
    pipe = make_pipe(StableDiffusionXLPipeline, None, unets[4])
    vae = trtvae.attach(pipe, tiny_fp32)
    out = capsys.readouterr().out
    assert isinstance(vae, OrtVae)
    assert "no CUDA GPU visible" in out and "ONNX Runtime" in out


def test_explicit_tensorrt_does_not_fall_back(unets, tiny_fp32, monkeypatch):
    _fake_trt(monkeypatch, _raise(ImportError("No module named 'tensorrt'")))
    pipe = make_pipe(StableDiffusionXLPipeline, None, unets[4])
    with pytest.raises(ImportError, match="tensorrt"):
        trtvae.attach(pipe, tiny_fp32, backend="trt")
    with pytest.raises(ValueError, match="backend="):
        trtvae.attach(pipe, tiny_fp32, backend="cuda")


def test_auto_prefers_tensorrt_when_it_loads(unets, tiny_fp32, monkeypatch, capsys):
    stand_in = OrtVae.from_pretrained(tiny_fp32)  # any VaeRuntime: the choice is what is tested
    _fake_trt(monkeypatch, lambda directory: stand_in)
    pipe = make_pipe(StableDiffusionXLPipeline, None, unets[4])
    assert trtvae.attach(pipe, tiny_fp32) is stand_in
    assert "TensorRT" in capsys.readouterr().out


def test_attach_warns_when_the_export_does_not_fit_the_pipeline(unets, tiny_fp32):
    pipe = make_pipe(StableDiffusionXLPipeline, None, unets[4])
    pipe.vae = types.SimpleNamespace(config={"latent_channels": 4, "scaling_factor": 0.13025})
    with pytest.warns(UserWarning, match="scaling_factor"):
        trtvae.attach(pipe, tiny_fp32, backend="ort", verbose=False)
