"""Trace one component to ONNX with dynamic batch/height/width, then check the graph before it counts.

torch.onnx.export's defaults moved between releases (dynamo, external data, opset), so
every one that matters is set here explicitly.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from ..components import ComponentSpec
from ..errors import ExportError
from ..files import atomic_path
from ..precision import DTYPE_NAME, DTYPES, OPSET, torch_dtype
from .wrappers import component_module

MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for a single-file model
# ONNX element type -> manifest dtype name, read off precision.DTYPES.
_ONNX_TYPE_NAMES = {names["onnx"]: name for name, names in DTYPES.items()}


def example_input(spec: ComponentSpec, dtype: torch.dtype) -> torch.Tensor:
    # Batch 2 and h != w: a size-1 or repeated example dim would be specialized into the graph.
    h, w = 4 * spec.downscale, 6 * spec.downscale
    return torch.randn(2, spec.in_channels, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)


def _dynamic_shapes(spec: ComponentSpec) -> tuple:
    # diffusers' Upsample2D calls .contiguous() on batches >= 64 (a no-op in the graph); without a bound
    # torch.export reports that guard as a violation and the ONNX exporter falls back to a second,
    # slower trace. The ONNX graph carries no range, so larger batches still run.
    batch, lh, lw = Dim("batch", max=63), Dim("latent_height"), Dim("latent_width")
    if spec.downscale > 1:
        lh, lw = spec.downscale * lh, spec.downscale * lw
    return ({0: batch, 2: lh, 3: lw},)  # positional: the graph's one input


def export_onnx(vae, spec: ComponentSpec, precision: str, path, fp32_norm: bool = False) -> tuple:
    """Export `spec`'s component of `vae` in `precision` to `path` (atomically).

    Returns the checked model and the sha256 of the bytes written, hashed from memory so
    a 100 MB graph is not read back from disk.
    """
    dtype = torch_dtype(precision)
    # The exporter logs a warning per missing torchvision op; none of them are used here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    module = component_module(vae, spec.name, dtype)
    if fp32_norm:
        from .fp16.fp32_norm import keep_norms_fp32

        keep_norms_fp32(module)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example_input(spec, dtype),),
            input_names=[spec.input_name],
            output_names=[spec.output_name],
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(spec),
            opset_version=OPSET[precision],
            external_data=False,
            optimize=True,
            verify=False,
            report=False,
            verbose=False,
        )
    model = program.model_proto
    del program, module
    _name_dims(model, spec)
    data = model.SerializeToString()
    check_graph(model, spec, precision, serialized=data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return model, hashlib.sha256(data).hexdigest()


def _name_dims(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Give the I/O dims the spec's names, everywhere the exporter's own symbol appears."""
    renames = {}
    for value, wanted in ((model.graph.input[0], spec.input_dims), (model.graph.output[0], spec.output_dims)):
        for dim, name in zip(value.type.tensor_type.shape.dim, wanted):
            if isinstance(name, str) and dim.dim_param and dim.dim_param != name:
                renames[dim.dim_param] = name
    if not renames:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def describe_io(values) -> list:
    return [
        {
            "name": v.name,
            "dtype": _ONNX_TYPE_NAMES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
            "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        }
        for v in values
    ]


def check_graph(model: onnx.ModelProto, spec: ComponentSpec, precision: str, serialized: bytes | None = None) -> None:
    """Reject a graph that a consumer could not rely on: checker, shapes, names, dims, ops, types, size."""
    where = f"{spec.name} ONNX"
    size = len(serialized) if serialized is not None else model.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise ExportError(f"{where} is {size / 2**30:.2f} GiB, over the 2 GiB single-file limit")
    # onnx's checks take bytes too; passing the serialized model once saves a re-serialization each.
    data = serialized if serialized is not None else model.SerializeToString()
    try:
        # full_check adds strict shape inference, run inside onnx's C++ without a second model in Python.
        onnx.checker.check_model(data, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{where} fails onnx's checker: {e}") from e
    inputs, outputs = describe_io(model.graph.input), describe_io(model.graph.output)
    expected_type = DTYPE_NAME[precision]
    for io, wanted_name, wanted_dims in ((inputs, spec.input_name, spec.input_dims),
                                         (outputs, spec.output_name, spec.output_dims)):
        if len(io) != 1 or io[0]["name"] != wanted_name:
            raise ExportError(f"{where}: I/O {[v['name'] for v in io]}, expected [{wanted_name!r}]")
        if io[0]["shape"] != list(wanted_dims):
            raise ExportError(
                f"{where}: {wanted_name!r} has shape {io[0]['shape']}, expected {list(wanted_dims)} "
                "(batch, height and width must stay symbolic; export with a batch >= 2 example)"
            )
        if io[0]["dtype"] != expected_type:
            raise ExportError(f"{where}: {wanted_name!r} is {io[0]['dtype']}, expected {expected_type}")
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign or len(model.functions):
        raise ExportError(f"{where} uses non-standard ops or functions {foreign}; only plain ai.onnx is allowed")
    # Resize's `scales` is float32 by the ONNX spec whatever the data type; so are the unit scale and
    # zero bias of an InstanceNormalization kept in fp32 by --fp32-norm (they must match its input's
    # type). Everything else must match.
    scales = {n.input[2] for n in model.graph.node if n.op_type == "Resize" and len(n.input) > 2}
    scales |= {i for n in model.graph.node if n.op_type == "InstanceNormalization" for i in n.input[1:]}
    # Floating-point weights only: integer constants (shapes, indices) have no precision.
    floats = set(DTYPE_NAME.values())
    types = {_ONNX_TYPE_NAMES.get(t.data_type) for t in model.graph.initializer if t.name not in scales}
    wrong = sorted((types & floats) - {expected_type})
    if wrong:
        raise ExportError(f"{where}: weights in {wrong} found in a {precision} graph")


def onnx_entry(model: onnx.ModelProto, spec: ComponentSpec, precision: str, path: Path) -> dict:
    """The manifest's description of one exported graph."""
    return {
        "onnx": Path(path).name,
        "precision": precision,
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": describe_io(model.graph.input),
        "outputs": describe_io(model.graph.output),
    }
