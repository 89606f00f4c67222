"""fp16 audit: run the fp32 model on calibration inputs and measure, per layer, how close fp16 comes to overflowing.

Recorded per layer (forward hooks on the fp32 model, max over all calibration inputs):
- `max_abs`: the largest |output| of every conv, linear, GroupNorm, ResNet (its residual
  sum, before `output_scale_factor`) and attention block (its residual sum). Each of
  these is stored as an fp16 tensor in an fp16 graph, so each must stay below 65504.
- `scores`: the largest |q·kᵀ·scale| of each attention block, which fp16 also stores.
- for each GroupNorm, `input_max_abs` and `norm_sq_max`: the largest squared deviation
  (x − μ)² of its input from its group mean. That is the per-element value a two-pass
  variance squares before averaging, and what a normalization kernel that keeps its
  statistics in fp16 would have to hold. (A one-pass E[x²] − μ² kernel squares x itself:
  bounded by input_max_abs².) ONNX Runtime's CPU InstanceNormalization accumulates fp16
  inputs in fp32 (measured: inputs of ±3000 give correct results), so this matters only
  for runtimes that do not; `--fp32-norm` removes the question.

The verdict `fp16_safe` is about stored activations: every `max_abs` at least
HEADROOM_BITS below 65504, since real images can be rougher than the calibration set.
`audit_model` is the one entry: calibrate → measure → annotate (which rescaling variable
each layer moves with). It judges nothing beyond the result's own verdict properties;
what to do about it is `decide.py`'s.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ...components import COMPONENTS, component_specs
from ..wrappers import component_graph
from .calibration import calibration_inputs
from .limits import FP16_MAX, HEADROOM_BITS, margin_bits
from .plan import RescaleError, plan_for


@dataclass
class LayerStat:
    name: str
    component: str
    kind: str
    max_abs: float = 0.0
    input_max_abs: float | None = None
    norm_sq_max: float | None = None
    norm_var_max: float | None = None  # the biased group variance GroupNorm computes; judged by decide.py
    scale_group: str | None = None  # the rescaling variable its output moves with; None: fixed

    @property
    def margin_bits(self) -> float:
        return margin_bits(self.max_abs)

    @property
    def norm_margin_bits(self) -> float:
        return margin_bits(self.norm_sq_max)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["margin_bits"] = _json_float(self.margin_bits)
        if self.norm_sq_max is not None:
            d["norm_sq_margin_bits"] = _json_float(self.norm_margin_bits)
        d["fixable_by_rescale"] = self.scale_group is not None
        return d


def _json_float(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass
class AuditResult:
    layers: list
    calibration: list  # [{component, label, shape}]
    outputs: dict = field(default_factory=dict, repr=False)  # component → [graph output per input]
    plan_error: str | None = None
    plans: dict = field(default_factory=dict, repr=False)  # component → rescale.Plan
    inputs: dict = field(default_factory=dict, repr=False)  # the calibration: component → [(label, tensor)]
    seconds: float = 0.0
    # The model's own config says force_upcast: true, the ecosystem's flag for "fp16 is unsafe".
    declares_force_upcast: bool = False

    # -- verdict -------------------------------------------------------------
    @property
    def worst(self) -> LayerStat | None:
        return max(self.layers, key=lambda s: s.max_abs, default=None)

    @property
    def margin_bits(self) -> float:
        return min((s.margin_bits for s in self.layers), default=math.inf)

    @property
    def fp16_safe(self) -> bool:
        return self.margin_bits >= HEADROOM_BITS

    @property
    def norm_margin_bits(self) -> float:
        return min((s.norm_margin_bits for s in self.layers if s.norm_sq_max is not None), default=math.inf)

    @property
    def norm_stats_fp16_safe(self) -> bool:
        return self.norm_margin_bits >= 0

    def over(self) -> list:
        """Layers within HEADROOM_BITS of the limit or over it."""
        return [s for s in self.layers if s.margin_bits < HEADROOM_BITS]

    @property
    def rescale_possible(self) -> bool:
        return self.plan_error is None and all(s.scale_group is not None for s in self.over())

    @property
    def recommendation(self) -> str:
        if not self.fp16_safe:
            return "rescale" if self.rescale_possible else "bf16-or-fp32"
        return "none" if self.norm_stats_fp16_safe else "fp32-norm"

    def advice(self) -> str:
        return {
            "none": "fp16 is safe as is",
            "rescale": "fp16 overflows; the exact rescaling fixes it (applied automatically by `vae-export "
                       "--precision fp16`), at no cost at run time",
            "bf16-or-fp32": "fp16 overflows where rescaling cannot reach"
                            + (f" ({self.plan_error})" if self.plan_error else
                               f": {', '.join(s.name for s in self.over() if s.scale_group is None)[:200]}")
                            + "; export with --precision bf16 or fp32",
            "fp32-norm": "activations fit fp16, but GroupNorm statistics exceed fp16 when kept in fp16: "
                         "use --fp32-norm for runtimes whose normalization does not accumulate in fp32 "
                         "(ONNX Runtime's does)",
        }[self.recommendation]

    def peaks(self) -> dict:
        """(layer, "out"|"in") → largest |value|, as the rescaling's scale choice wants it."""
        out = {}
        for s in self.layers:
            out[(s.name, "out")] = s.max_abs
            if s.input_max_abs is not None:
                out[(s.name, "in")] = s.input_max_abs
        return out

    def summary(self) -> dict:
        worst = self.worst
        return {
            "fp16_safe": self.fp16_safe,
            "margin_bits": _json_float(round(self.margin_bits, 2)),
            "headroom_bits": HEADROOM_BITS,
            "max_abs": worst.max_abs if worst else 0.0,
            "worst_layer": worst.name if worst else None,
            "norm_stats_fp16_safe": self.norm_stats_fp16_safe,
            "norm_sq_margin_bits": _json_float(round(self.norm_margin_bits, 2)),
            "rescale_possible": self.rescale_possible,
            "recommendation": self.recommendation,
            "declares_force_upcast": self.declares_force_upcast,
            "seconds": round(self.seconds, 1),
        }

    def as_dict(self) -> dict:
        return {**self.summary(), "advice": self.advice(), "fp16_max": FP16_MAX, "plan_error": self.plan_error,
                "calibration": self.calibration, "layers": [s.as_dict() for s in self.layers]}


_KINDS = ((nn.Conv2d, "conv"), (nn.ConvTranspose2d, "conv"), (nn.Linear, "linear"), (nn.GroupNorm, "norm"))


def _kind(module) -> str | None:
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    name = type(module).__name__
    return {"ResnetBlock2D": "resnet", "Attention": "attention"}.get(name)


class _Recorder:
    def __init__(self, component: str):
        self.component = component
        self.stats: dict = {}

    def stat(self, name, kind) -> LayerStat:
        if name not in self.stats:
            self.stats[name] = LayerStat(name, self.component, kind)
        return self.stats[name]

    def output_hook(self, name, kind, factor=1.0):
        def hook(module, args, output):
            s = self.stat(name, kind)
            s.max_abs = max(s.max_abs, _max_abs(output.detach()) * factor)
        return hook

    def norm_input_hook(self, name):
        def hook(module, args):
            g = args[0].detach().reshape(args[0].shape[0], module.num_groups, -1)
            var, mean = torch.var_mean(g, dim=-1, correction=0)
            lo, hi = torch.aminmax(g, dim=-1)
            # The largest (x - mean)² of a group is at its min or its max: no squared copy of x needed.
            dev = torch.maximum(hi - mean, mean - lo)
            s = self.stat(name, "norm")
            s.input_max_abs = max(s.input_max_abs or 0.0, float(torch.maximum(hi.abs(), lo.abs()).amax()))
            s.norm_sq_max = max(s.norm_sq_max or 0.0, float(dev.amax()) ** 2)
            s.norm_var_max = max(s.norm_var_max or 0.0, float(var.amax()))
        return hook

    def scores_hook(self, name):
        # Recomputes q·kᵀ the way diffusers' processor does: the scores are never a module output.
        def hook(module, args, output):
            x = args[0].detach()
            b, c = x.shape[:2]
            h = x.reshape(b, c, -1)
            if module.group_norm is not None:
                h = module.group_norm(h)
            h = h.transpose(1, 2)
            heads = module.heads
            q = module.to_q(h).view(b, -1, heads, c // heads).transpose(1, 2)
            k = module.to_k(h).view(b, -1, heads, c // heads).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)) * module.scale
            s = self.stat(f"{name}.scores", "scores")
            s.max_abs = max(s.max_abs, _max_abs(scores))
        return hook


def _max_abs(t: torch.Tensor) -> float:
    lo, hi = torch.aminmax(t)  # one pass, no |t| copy: hooks run on every activation
    return max(abs(float(lo)), abs(float(hi)))


def _hook(vae, component: str, recorder: _Recorder) -> list:
    spec = component_specs(vae.config)[component]
    handles = []
    for name, module in vae.named_modules():
        kind = _kind(module)
        if kind is None or not spec.owns(name):
            continue
        if kind == "norm":
            handles.append(module.register_forward_pre_hook(recorder.norm_input_hook(name)))
        if kind == "attention":
            handles.append(module.register_forward_hook(recorder.scores_hook(name)))
        # The residual sum is what fp16 holds; the block divides it afterwards.
        factor = float(getattr(module, "output_scale_factor", getattr(module, "rescale_output_factor", 1.0)))
        handles.append(module.register_forward_hook(recorder.output_hook(name, kind, factor)))
    return handles


@torch.no_grad()
def measure(vae, components, calibration: dict) -> AuditResult:
    """Run the fp32 graphs of `components` on `calibration` with hooks; the per-layer maxima."""
    layers, outputs, described = [], {}, []
    with torch.autocast("cpu", enabled=False):
        for component in components:
            recorder = _Recorder(component)
            handles = _hook(vae, component, recorder)
            graph = component_graph(vae, component)
            try:
                outputs[component] = [graph(x.float()) for _, x in calibration[component]]
            finally:
                for h in handles:
                    h.remove()
            layers += recorder.stats.values()
            described += [{"component": component, "label": label, "shape": list(x.shape)}
                          for label, x in calibration[component]]
    return AuditResult(layers, described, outputs)


def annotate(vae, result: AuditResult) -> None:
    """Mark each layer with the rescaling variable it moves with, if the model can be rescaled."""
    components = tuple(result.outputs)
    try:
        plans = {c: plan_for(vae, c) for c in components}
    except RescaleError as e:
        result.plan_error = e.reason
        return
    result.plans = plans
    for s in result.layers:
        plan = plans[s.component]
        s.scale_group = plan.scale_of(s.name, "out")


def audit_model(vae, components=COMPONENTS, calibration: dict | None = None, image_dir=None) -> AuditResult:
    """Audit `vae` (fp32, unchanged): calibrate (unless `calibration` is given) → measure → annotate.

    The calibration used is kept on the result, so a rescaled copy is audited on the same inputs.
    `image_dir`: a folder of the user's images added to the built-in calibration.
    """
    start = time.perf_counter()
    calibration = calibration or calibration_inputs(vae, components, image_dir=image_dir)
    result = measure(vae, components, calibration)
    annotate(vae, result)
    result.inputs = calibration
    # diffusers' default is true, so a config without the key declares it too, as pipelines read it.
    result.declares_force_upcast = bool(getattr(vae.config, "force_upcast", False))
    result.seconds = time.perf_counter() - start
    return result
