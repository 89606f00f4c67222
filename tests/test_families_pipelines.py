"""SD1.x, SD3 and FLUX.1 pipelines (text-to-image and img2img) give the same images with OrtVae as with PyTorch.

Denoisers are built here from tiny random configs (a UNet for SD1, one-layer SD3 and FLUX transformers), with
prompt embeddings passed directly (no text encoders). Each family's tiny VAE has its latent contract (channels,
quant convs, scaling and shift factors) and a spatial factor of 2, not 8: so `attach()` must fix what a
pipeline built without a VAE derived, FLUX's image processor at twice the factor included. SDXL: test_attach.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # diffusers' pipelines import it

from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from family_models import family_vae

import trtvae
from trtvae import OrtVae
from trtvae.export.options import ExportOptions
from trtvae.export.run import run_export
from trtvae.metrics import REL_L2_THRESHOLD, compare

FP32 = REL_L2_THRESHOLD["fp32"]
TEXT_DIM = 32
SIZE = 32  # pixels: 16×16 latents with the tiny VAEs (FLUX packs them into 8×8 tokens)
LATENT = SIZE // 2


def _seeded(make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make().eval().requires_grad_(False)


def sd15_parts():
    unet = _seeded(lambda: UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=4))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    return dict(unet=unet, scheduler=scheduler, text_encoder=None, tokenizer=None, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def sd3_parts():
    transformer = _seeded(lambda: SD3Transformer2DModel(
        sample_size=LATENT, patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=TEXT_DIM, pos_embed_max_size=LATENT))
    return dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=None,
                tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def flux_parts():
    transformer = _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=False,
        axes_dims_rope=(4, 4, 8)))
    return dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None,
                tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def _embeds(pooled: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"prompt_embeds": torch.randn(1, 7, TEXT_DIM, generator=g)}
    if pooled:
        out["pooled_prompt_embeds"] = torch.randn(1, TEXT_DIM, generator=g)
    return out


def _image():
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# family → (denoiser parts, text-to-image class, img2img class, the image processor's multiple of the factor)
FAMILIES = {
    "sd15": (sd15_parts, StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, 1),
    "sd3": (sd3_parts, StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, 1),
    "flux": (flux_parts, FluxPipeline, FluxImg2ImgPipeline, 2),  # 2×2 latent packing
}
CASES = [(family, mode) for family in FAMILIES for mode in ("text2img", "img2img")]


class Family:
    """One family's tiny VAE, its fp32 export, its denoiser and the PyTorch reference images, made once."""

    def __init__(self, name, tmp_path_factory):
        self.name = name
        self.torch_vae = family_vae(name, block_out_channels=[8, 16], norm_num_groups=4)
        folder = tmp_path_factory.mktemp(f"{name}_vae")
        self.torch_vae.save_pretrained(folder)
        # verify off: these tests compare whole pipelines' images instead.
        self.export = run_export(ExportOptions(model=str(folder), family=name, precision="fp32", engines="skip",
                                               verify=False, out=tmp_path_factory.mktemp(f"{name}_fp32")))
        make_parts, t2i, i2i, self.processor_multiple = FAMILIES[name]
        self.parts = make_parts()
        self.classes = {"text2img": t2i, "img2img": i2i}
        self.references = {}

    def pipe(self, mode, vae):
        pipe = self.classes[mode](vae=vae, **self.parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self, pipe, mode):
        kw = dict(num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **_embeds(pooled=self.name != "sd15"))
        if mode == "img2img":
            kw.update(image=_image(), strength=0.6, num_inference_steps=4)
        if not (mode == "img2img" and self.name == "sd15"):  # SD1's img2img takes its size from the image
            kw.update(height=SIZE, width=SIZE)
        with torch.no_grad():
            return pipe(**kw).images

    def reference(self, mode):
        if mode not in self.references:
            self.references[mode] = self.run(self.pipe(mode, self.torch_vae), mode)
        return self.references[mode]


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = Family(name, tmp_path_factory)
        return made[name]
    return get


def _assert_same_images(ours, theirs):
    stats = compare(ours, theirs)
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
    assert stats.nonfinite == 0 and stats.rel_l2 <= FP32, stats
    assert float(theirs.std()) > 0.01  # a real image, not a constant one that would match anything


@pytest.mark.parametrize("name,mode", CASES)
def test_swap_in_two_lines_gives_the_same_images(name, mode, family):
    fam = family(name)
    pipe = fam.pipe(mode, fam.torch_vae)
    pipe.vae = OrtVae.from_pretrained(fam.export)
    assert pipe.vae.config.shift_factor == fam.torch_vae.config.shift_factor
    assert pipe.vae.config.scaling_factor == fam.torch_vae.config.scaling_factor
    _assert_same_images(fam.run(pipe, mode), fam.reference(mode))


@pytest.mark.parametrize("name,mode", CASES)
def test_attach_to_a_pipeline_built_without_a_vae(name, mode, family, capsys):
    fam = family(name)
    pipe = fam.pipe(mode, None)
    assert pipe.vae_scale_factor == 8  # diffusers' guess without a VAE: wrong for this one
    vae = trtvae.attach(pipe, fam.export)
    assert "OrtVae" in capsys.readouterr().out
    assert pipe.vae is vae and pipe.vae_scale_factor == 2
    assert pipe.image_processor.config.vae_scale_factor == 2 * fam.processor_multiple
    _assert_same_images(fam.run(pipe, mode), fam.reference(mode))
