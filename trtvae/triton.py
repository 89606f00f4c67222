"""A Triton Inference Server model repository from an export folder, read from its manifest alone.

Layout: `<repo>/<prefix>_<component>/config.pbtxt` and `<repo>/<prefix>_<component>/1/model.plan` (platform
`tensorrt_plan`) or `1/model.onnx` (platform `onnxruntime_onnx`). With `max_batch_size > 0` Triton's dims
omit the batch dim; -1 marks a size the model accepts in a range.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import OptionError
from . import defaults
from .files import atomic_path
from .manifest import component_file, read_manifest

_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}
BACKENDS = ("tensorrt", "onnx")


def _dims(shape: list) -> list:
    """Manifest shape without its batch dim, symbolic sizes as -1."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def _static_dims(profiles: list, input_dims: list, output_dims: list, upscale: int, downscale: int):
    """Where every profile has one H×W, Triton can be told the exact sizes."""
    sizes = {(tuple(p["min"][2:]), tuple(p["max"][2:])) for p in profiles}
    if len(sizes) != 1:
        return input_dims, output_dims
    (lo, hi), = sizes
    if lo != hi:
        return input_dims, output_dims
    h, w = lo
    return [input_dims[0], h, w], [output_dims[0], h * upscale // downscale, w * upscale // downscale]


def config_pbtxt(name: str, platform: str, max_batch: int, io: dict) -> str:
    def block(t):
        return (f"  {{\n    name: \"{t['name']}\"\n    data_type: {_TRITON_TYPES[t['dtype']]}\n"
                f"    dims: [ {', '.join(map(str, t['dims']))} ]\n  }}")

    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
             "input [\n" + block(io["input"]) + "\n]",
             "output [\n" + block(io["output"]) + "\n]",
             # Triton batches only requests of the same shape; different sizes run as they come.
             "dynamic_batching { }"]
    return "\n".join(lines) + "\n"


def write_triton_repo(export_dir, repo, backend: str = "tensorrt", prefix: str = defaults.TRITON_PREFIX,
                      max_batch: int = defaults.TRITON_MAX_BATCH) -> list:
    """Write one Triton model per component; return the model folders written."""
    if backend not in BACKENDS:
        raise OptionError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    manifest = read_manifest(export_dir)
    from .components import component_specs

    specs = component_specs(manifest["vae_config"])
    written = []
    for component, entry in manifest["components"].items():
        spec = specs[component]
        if backend == "tensorrt":
            engine = entry.get("engine")
            if engine is None:
                raise OptionError(f"{export_dir} has no {component} engine (built where TensorRT and a GPU are "
                                  "present); use --backend onnx, or build the engines first")
            source = component_file(export_dir, manifest, component, key="engine")
            profiles = [p[spec.input_name] for p in engine["profiles"]]
            batch = max(p["max"][0] for p in profiles)
            if min(p["min"][0] for p in profiles) > 1:
                raise OptionError(f"the {component} engine's profiles start at batch "
                                  f"{min(p['min'][0] for p in profiles)}, but Triton sends batches from 1: "
                                  "rebuild with --batch 1-N")
            platform, filename = "tensorrt_plan", "model.plan"
        else:
            source = component_file(export_dir, manifest, component)
            profiles, batch = [], max_batch
            platform, filename = "onnxruntime_onnx", "model.onnx"
        inp, out = entry["inputs"][0], entry["outputs"][0]
        in_dims, out_dims = _dims(inp["shape"]), _dims(out["shape"])
        if profiles:
            in_dims, out_dims = _static_dims(profiles, in_dims, out_dims, spec.upscale, spec.downscale)
        name = f"{prefix}_{component}"
        folder = Path(repo) / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        for other in ("model.plan", "model.onnx"):  # a repository written earlier for the other backend
            if other != filename:
                (folder / "1" / other).unlink(missing_ok=True)
        with atomic_path(folder / "1" / filename) as tmp:
            shutil.copyfile(source, tmp)
        io = {"input": {"name": inp["name"], "dtype": inp["dtype"], "dims": in_dims},
              "output": {"name": out["name"], "dtype": out["dtype"], "dims": out_dims}}
        with atomic_path(folder / "config.pbtxt") as tmp:
            tmp.write_text(config_pbtxt(name, platform, batch, io))
        written.append(folder)
    return written
