"""Segment graphs for exact tiling: each segment of `segment_modules` exported to its own small ONNX file.

Exported from PyTorch modules over the same (possibly fp16-rescaled) weights as the component graphs,
rather than sliced out of decoder.onnx: the cut points are module boundaries, the normalization to
replace is a module, and the exporter, not a graph surgery, keeps names and types right. The manifest
lists each file with its sha256, halo, scale and I/O, under the component's "segments" key.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from ..errors import ExportError
from ..files import atomic_path
from ..precision import DTYPE_NAME, OPSET, torch_dtype
from .onnx_export import describe_io
from .segment_modules import decoder_segments, encoder_segments

SEGMENT_BUILDERS = {"decoder": decoder_segments, "encoder": encoder_segments}
STAT_DTYPE = "float32"  # mean and rstd inputs, and activations between segments: never rounded to fp16


def segment_file_name(component: str, index: int) -> str:
    return f"{component}.segment{index:02d}.onnx"


def _cast_copy(vae, dtype: torch.dtype):
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in vae.parameters()}
    memo.update({id(b): b.detach().to(dtype) if b.is_floating_point() else b.clone() for b in vae.buffers()})
    return copy.deepcopy(vae, memo).eval().requires_grad_(False)


def _example(seg, dtype):
    """Example inputs and their dynamic axes (batch 2, h != w, so no dim is specialized)."""
    h, w = 4 * seg.downscale, 6 * seg.downscale
    g = torch.Generator().manual_seed(0)
    image_axes = {0: "batch", 2: "height", 3: "width"}
    # The component's input is in the model's type; activations between segments are float32.
    x_dtype = dtype if seg.source < 0 else torch.float32
    args, axes = [torch.randn(2, seg.in_channels, h, w, generator=g).to(x_dtype)], {"x": image_axes}
    if seg.norm is not None:
        args += [torch.randn(2, seg.in_channels, generator=g), torch.rand(2, seg.in_channels, generator=g) + 0.5]
        axes.update(mean={0: "batch"}, rstd={0: "batch"})
    if seg.kind == "attention":  # x: query rows; kv: every key and value
        args.append(torch.randn(2, 2 * seg.in_channels, 2 * h, w, generator=g))
        axes["kv"] = {0: "batch", 2: "kv_height", 3: "width"}
    if seg.residual is not None:
        # The residual is the resnet's input, cut with the same window as x.
        args.append(torch.randn(2, seg.extra["residual_channels"], h, w, generator=g))
        axes["residual"] = image_axes
    axes["y"] = {0: "batch", 2: "out_height", 3: "out_width"}
    return tuple(args), axes


def export_segment(seg, dtype: torch.dtype, precision: str, path: Path) -> tuple:
    """Export one segment module; returns (checked model, sha256 of the bytes written)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    args, axes = _example(seg, dtype)
    buffer = io.BytesIO()
    # TorchScript export: for modules this small it takes a tenth of a second where the dynamo
    # exporter takes seconds each, and an export holds dozens of segments.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(seg.module, args, buffer, input_names=list(axes)[:-1], output_names=["y"],
                          dynamic_axes=axes, opset_version=OPSET[precision], dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    data = model.SerializeToString()
    try:
        onnx.checker.check_model(data, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"segment {seg.name} ONNX fails onnx's checker: {e}") from e
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return model, hashlib.sha256(data).hexdigest()


def export_segments(export_vae, component: str, precision: str, out: Path, fp32_norm: bool = False) -> dict:
    """Write `component`'s segment graphs into `out`; return the manifest's "segments" entry."""
    dtype = torch_dtype(precision)
    model = _cast_copy(export_vae, dtype)
    steps = SEGMENT_BUILDERS[component](model)
    entries = []
    for index, seg in enumerate(steps):
        if seg.residual is not None:
            seg.extra["residual_channels"] = steps[seg.residual].out_channels if seg.residual >= 0 else None
        if seg.kind == "whole" and fp32_norm:  # the whole-run parts keep their GroupNorms, as the component graph does
            from .fp16.fp32_norm import keep_norms_fp32

            keep_norms_fp32(seg.module)
        path = out / segment_file_name(component, index)
        graph, digest = export_segment(seg, dtype, precision, path)
        entries.append({
            "name": seg.name, "file": path.name, "sha256": digest, "kind": seg.kind,
            "source": seg.source, "residual": seg.residual, "norm": seg.norm,
            "halo": seg.halo, "upscale": seg.upscale, "downscale": seg.downscale, "align": seg.align,
            "in_channels": seg.in_channels, "out_channels": seg.out_channels,
            "inputs": describe_io(graph.graph.input), "outputs": describe_io(graph.graph.output),
        })
    return {"format": "exact-tiling-v1", "dtype": DTYPE_NAME[precision], "stat_dtype": STAT_DTYPE,
            "steps": entries}
