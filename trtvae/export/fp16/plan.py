"""The rescaling plan: which tensors of an AutoencoderKL may carry which power-of-two scale.

Every GroupNorm is invariant to a positive scale of its input once its eps is scaled by
the square of that scale. So each stretch of the residual stream between two convs that
can change its scale, and each ResNet's inner activation (conv1 → norm2), can be multiplied
by its own constant. Everything right after a norm (and the graph's inputs and outputs)
stays at scale 1.

The walk below turns the module tree into a plan:
- `Affine(name, src, dst)`: a conv or linear whose input lives at scale `src` and output at
  `dst`: weight × dst/src, bias × dst. (`None` is the fixed scale 1.)
- `Norm(name, src)`: a GroupNorm whose input lives at `src`: eps × src².
- `members`: which audited tensors move with which scale, so the audit can choose them.

Anything the walk does not recognise raises RescaleError: an unknown module could break exactness.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...components import component_specs
from ...errors import ExportError

ONE = None  # the fixed scale: graph inputs and outputs, and everything computed from a norm's output


class RescaleError(ExportError):
    """The model holds something the exact rewrite does not understand."""

    def __init__(self, reason: str):
        super().__init__(f"the exact fp16 rescaling does not understand this VAE: {reason}. "
                         "Export with --precision bf16 or fp32, or try --fp32-norm")
        self.reason = reason


@dataclass
class Affine:
    name: str
    src: str | None
    dst: str | None


@dataclass
class Norm:
    name: str
    src: str | None


@dataclass
class Plan:
    affines: list = field(default_factory=list)
    norms: list = field(default_factory=list)
    # scale variable → [(audited layer name, field)], field "out" (module output) or "in" (norm input)
    members: dict = field(default_factory=dict)

    def scale_of(self, layer: str, which: str = "out") -> str | None:
        for var, names in self.members.items():
            if (layer, which) in names:
                return var
        return ONE

    # -- building -------------------------------------------------------------
    def affine(self, name, src, dst):
        self.affines.append(Affine(name, src, dst))
        self._member(dst, name, "out")

    def norm(self, name, src):
        self.norms.append(Norm(name, src))
        self._member(src, name, "in")

    def new(self, var):
        self.members.setdefault(var, [])
        return var

    def _member(self, var, name, which):
        if var is not ONE:
            self.members.setdefault(var, []).append((name, which))


def _need(ok: bool, what: str):
    if not ok:
        raise RescaleError(what)


def _attr_is(module, attr, cls) -> bool:
    return isinstance(getattr(module, attr, None), cls)


def _resnet(plan: Plan, m, name: str, s):
    from diffusers.models.resnet import ResnetBlock2D

    _need(type(m) is ResnetBlock2D, f"{name} is a {type(m).__name__}, not a ResnetBlock2D")
    _need(m.time_emb_proj is None and m.upsample is None and m.downsample is None,
          f"{name} has a time embedding or an inner up/downsampler")
    _need(all(_attr_is(m, a, nn.GroupNorm) for a in ("norm1", "norm2")), f"{name}'s norms are not GroupNorm")
    _need(all(_attr_is(m, a, nn.Conv2d) for a in ("conv1", "conv2")), f"{name}'s convs are not Conv2d")
    plan.norm(f"{name}.norm1", s)
    inner = plan.new(f"{name}.conv1")
    plan.affine(f"{name}.conv1", ONE, inner)
    plan.norm(f"{name}.norm2", inner)
    out = s
    if m.conv_shortcut is not None:
        _need(isinstance(m.conv_shortcut, nn.Conv2d), f"{name}.conv_shortcut is not a Conv2d")
        # A 1×1 conv carries the skip path: the stream may take a new scale here.
        out = plan.new(f"{name}")
        plan.affine(f"{name}.conv_shortcut", s, out)
    plan.affine(f"{name}.conv2", ONE, out)
    # (skip + residual) / output_scale_factor is linear: the sum lives at the output scale.
    plan._member(out, name, "out")
    return out


def _attention(plan: Plan, m, name: str, s):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    _need(type(m) is Attention, f"{name} is a {type(m).__name__}")
    _need(type(m.processor) in (AttnProcessor, AttnProcessor2_0),
          f"{name} uses the attention processor {type(m.processor).__name__}")
    _need(isinstance(m.group_norm, nn.GroupNorm), f"{name} has no GroupNorm on its input (softmax is not scale-free)")
    plain = all(getattr(m, a, None) is None for a in ("spatial_norm", "norm_q", "norm_k", "add_k_proj"))
    _need(plain and not getattr(m, "is_cross_attention", False), f"{name} is not a plain self-attention block")
    _need(isinstance(m.to_out[0], nn.Linear), f"{name}.to_out[0] is not a Linear")
    plan.norm(f"{name}.group_norm", s)
    for proj in ("to_q", "to_k", "to_v"):
        plan.affine(f"{name}.{proj}", ONE, ONE)
    # The output projection joins the stream (residual_connection) and takes its scale.
    plan.affine(f"{name}.to_out.0", ONE, s)
    plan._member(s, name, "out")
    return s


def _mid(plan: Plan, m, name: str, s):
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    _need(type(m) is UNetMidBlock2D, f"{name} is a {type(m).__name__}")
    s = _resnet(plan, m.resnets[0], f"{name}.resnets.0", s)
    for i, (attn, resnet) in enumerate(zip(m.attentions, m.resnets[1:])):
        if attn is not None:
            s = _attention(plan, attn, f"{name}.attentions.{i}", s)
        s = _resnet(plan, resnet, f"{name}.resnets.{i + 1}", s)
    return s


def _sampler(plan: Plan, m, name: str, s):
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    _need(type(m) in (Upsample2D, Downsample2D), f"{name} is a {type(m).__name__}")
    _need(getattr(m, "norm", None) is None, f"{name} normalizes its input")
    if isinstance(m, Upsample2D):
        _need(m.use_conv_transpose or getattr(m, "interpolate", True), f"{name} neither interpolates nor transposes")
    if not m.use_conv:
        return s  # nearest interpolation or average pooling: linear, the scale passes through
    attr = "conv" if m.name == "conv" or isinstance(m, Downsample2D) else "Conv2d_0"
    conv = getattr(m, attr)
    _need(isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)), f"{name}.{attr} is a {type(conv).__name__}")
    out = plan.new(f"{name}.{attr}")
    plan.affine(f"{name}.{attr}", s, out)
    return out


def _blocks(plan: Plan, blocks, name: str, s, block_type: str, sampler_attr: str):
    for i, block in enumerate(blocks):
        _need(type(block).__name__ == block_type, f"{name}.{i} is a {type(block).__name__}, not {block_type}")
        for j, resnet in enumerate(block.resnets):
            s = _resnet(plan, resnet, f"{name}.{i}.resnets.{j}", s)
        for j, sampler in enumerate(getattr(block, sampler_attr) or []):
            s = _sampler(plan, sampler, f"{name}.{i}.{sampler_attr}.{j}", s)
    return s


def plan_decoder(vae) -> Plan:
    """post_quant_conv → conv_in → mid → up blocks → conv_norm_out → conv_out."""
    plan = Plan()
    dec = vae.decoder
    src = ONE
    if vae.post_quant_conv is not None:
        # The latent's own 1×1 conv may carry a scale too; conv_in then takes it out again.
        src = plan.new("post_quant_conv")
        plan.affine("post_quant_conv", ONE, src)
    s = plan.new("decoder.conv_in")
    plan.affine("decoder.conv_in", src, s)
    s = _mid(plan, dec.mid_block, "decoder.mid_block", s)
    s = _blocks(plan, dec.up_blocks, "decoder.up_blocks", s, "UpDecoderBlock2D", "upsamplers")
    _need(isinstance(dec.conv_norm_out, nn.GroupNorm), "decoder.conv_norm_out is not a GroupNorm (spatial norm?)")
    plan.norm("decoder.conv_norm_out", s)
    plan.affine("decoder.conv_out", ONE, ONE)
    _check_covered(plan, vae, "decoder")
    return plan


def plan_encoder(vae) -> Plan:
    """conv_in → down blocks → mid → conv_norm_out → conv_out → quant_conv."""
    plan = Plan()
    enc = vae.encoder
    s = plan.new("encoder.conv_in")
    plan.affine("encoder.conv_in", ONE, s)
    s = _blocks(plan, enc.down_blocks, "encoder.down_blocks", s, "DownEncoderBlock2D", "downsamplers")
    s = _mid(plan, enc.mid_block, "encoder.mid_block", s)
    _need(isinstance(enc.conv_norm_out, nn.GroupNorm), "encoder.conv_norm_out is not a GroupNorm")
    plan.norm("encoder.conv_norm_out", s)
    if vae.quant_conv is not None:
        moments = plan.new("encoder.conv_out")
        plan.affine("encoder.conv_out", ONE, moments)
        plan.affine("quant_conv", moments, ONE)
    else:
        plan.affine("encoder.conv_out", ONE, ONE)
    _check_covered(plan, vae, "encoder")
    return plan


PLANNERS = {"decoder": plan_decoder, "encoder": plan_encoder}


def _check_covered(plan: Plan, vae, component: str) -> None:
    """Every module with weights must be in the plan: an unknown one could break exactness."""
    spec = component_specs(vae.config)[component]
    known = {a.name for a in plan.affines} | {n.name for n in plan.norms}
    stray = []
    for name, module in vae.named_modules():
        if not spec.owns(name):
            continue
        if any(True for _ in module.parameters(recurse=False)) and name not in known:
            stray.append(f"{name} ({type(module).__name__})")
    _need(not stray, f"modules outside the known structure: {', '.join(stray[:5])}")


def plan_for(vae, component: str) -> Plan:
    return PLANNERS[component](vae)
