"""Triton Inference Server model repositories from an export folder, read from its manifest alone.

Backends:
- `tensorrt`: `<repo>/<prefix>_<component>/1/model.plan`, platform `tensorrt_plan`.
- `onnx`: `1/model.onnx`, platform `onnxruntime_onnx`.
- `python`: the three served models of `models.py` (decoder, encoder, decode_image) on Triton's Python
  backend: `1/model.py` imports trtvae's `TritonPythonModel`, and `1/export/` holds the manifest and the
  files that model needs, so the repository is self-contained (trtvae itself must be installed in the
  server's Python). `vae-export serve` runs this same repository. Their config.pbtxt parameters carry
  the runtime and the exact-tiling size (`tile`, see models.py); Triton's native backends never tile.

With `max_batch_size > 0` Triton's dims omit the batch dim; -1 marks a size the model accepts in a range.
Triton batches only requests of the same shape.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import defaults
from ..components import component_specs
from ..errors import OptionError
from ..files import atomic_path
from ..manifest import component_file, engine_profiles, read_manifest, write_manifest
from ..precision import DTYPES
from .models import check_tile, model_decls

BACKENDS = ("tensorrt", "onnx", "python")
RUNTIMES = defaults.RUNTIMES
MODEL_PY = '''"""Triton Python backend entry of a trtvae served model: the implementation is trtvae's own."""
from trtvae.serving.python_backend import TritonPythonModel  # noqa: F401
'''


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


def model_config(name: str, max_batch: int, io: dict, platform: str | None = None, backend: str | None = None,
                 instances: int | None = None, parameters: dict | None = None, dynamic_batching: bool = True):
    """Triton's own `ModelConfig` message: `io` maps "input"/"output" to {name, dtype (manifest name), dims}."""
    pb = _schema()
    config = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if platform:
        config.platform = platform
    else:
        config.backend = backend
    for field, t in (("input", io["input"]), ("output", io["output"])):
        getattr(config, field).add(name=t["name"], data_type=pb.DataType.Value(DTYPES[t["dtype"]]["triton"]),
                                   dims=list(t["dims"]))
    if dynamic_batching:
        config.dynamic_batching.SetInParent()  # requests of one shape are batched; other sizes run as they come
    if instances:
        config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    return config


def config_pbtxt(*args, **kwargs) -> str:
    """`model_config(...)` in protobuf text format, as Triton reads config.pbtxt."""
    from google.protobuf import text_format

    return text_format.MessageToString(model_config(*args, **kwargs))


def _schema():
    """tritonclient's copy of Triton's model_config.proto."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise OptionError(f"writing a Triton model config needs tritonclient ({e}): pip install 'trtvae[triton]'") \
            from None
    return model_config_pb2


def check_model_options(prefix: str, max_batch: int, instances: int) -> None:
    """What every served model's config needs: a name Triton accepts, and counts of at least one."""
    for flag, value in (("--max-batch", max_batch), ("--instances", instances)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{flag} {value!r}: expected a whole number, at least 1")
    # Triton names a model by its folder; keep it one plain path component.
    if not isinstance(prefix, str) or not prefix or not prefix.replace("_", "").replace("-", "").isalnum() \
            or not prefix.isascii() or prefix.startswith("-"):
        raise OptionError(f"--prefix {prefix!r}: expected ASCII letters, digits, '_' or '-', not starting with '-' "
                          "(it names Triton models and their folders)")


def write_triton_repo(export_dir, repo, backend: str = "tensorrt", prefix: str = defaults.TRITON_PREFIX,
                      max_batch: int = defaults.TRITON_MAX_BATCH, instances: int = defaults.TRITON_INSTANCES, runtime: str = "auto",
                      dynamic_batching: bool = True, export_in_place: bool = False,
                      tile: int | None = defaults.SERVE_TILE) -> list:
    """Write one Triton model per served model; return the model folders written.

    Args:
        export_dir: a finished export folder (holding manifest.json).
        repo: the model repository to write into (created if missing).
        backend: "tensorrt", "onnx" (Triton's native backends, one model per component) or "python"
            (trtvae's decoder, encoder and decode_image models).
        prefix: model names are `<prefix>_<model>`.
        max_batch: `max_batch_size` of ONNX and Python models (TensorRT: the engine profile's).
        instances, runtime, dynamic_batching: Python backend only: model instances, the runtime the
            model loads (auto, tensorrt, onnxruntime), and Triton's dynamic batching on or off.
        export_in_place: Python backend only: point the models at `export_dir` instead of copying it.
        tile: Python backend only: requests larger than this many image pixels a side are tiled exactly
            where the export holds segment graphs (None: the model's own sample_size; 0: never).
    """
    if backend not in BACKENDS:
        raise OptionError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if runtime not in RUNTIMES:
        raise OptionError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    check_model_options(prefix, max_batch, instances)
    if tile is not None and backend != "python":
        raise OptionError(f"--tile {tile!r}: only --backend python tiles (Triton's {backend} backend runs the "
                          "whole graph); leave --tile out")
    if Path(repo).exists() and not Path(repo).is_dir():
        raise OptionError(f"--repo {repo}: is a file, expected a folder (the model repository)")
    manifest = read_manifest(export_dir)
    check_tile(tile, manifest["vae_config"])
    if backend == "python" and manifest["io_dtype"] not in ("float32", "float16"):
        raise OptionError(f"--backend python serves fp32 and fp16 exports; this one is {manifest['precision']} "
                          "(Triton's Python backend hands tensors over as numpy, which has no bfloat16): "
                          "use --backend tensorrt, or export with --precision fp16")
    if backend == "python":
        return [_write_python_model(export_dir, manifest, repo, d, max_batch, instances, runtime, prefix,
                                    dynamic_batching, export_in_place, tile) for d in model_decls(manifest, prefix)]
    return [_write_native_model(export_dir, manifest, repo, backend, component, prefix, max_batch)
            for component in manifest["components"]]


def _write_native_model(export_dir, manifest, repo, backend, component, prefix, max_batch) -> Path:
    spec = component_specs(manifest["vae_config"])[component]
    entry = manifest["components"][component]
    if backend == "tensorrt":
        engine = entry.get("engine")
        if engine is None:
            raise OptionError(f"{export_dir} has no {component} engine (built where TensorRT and a GPU are "
                              "present); use --backend onnx or python, or build the engines first")
        source = component_file(export_dir, manifest, component, key="engine")
        profiles = engine_profiles(engine, spec.input_name)
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
    _clear_version(folder, keep=filename)
    with atomic_path(folder / "1" / filename) as tmp:
        shutil.copyfile(source, tmp)
    io = {"input": {"name": inp["name"], "dtype": inp["dtype"], "dims": in_dims},
          "output": {"name": out["name"], "dtype": out["dtype"], "dims": out_dims}}
    with atomic_path(folder / "config.pbtxt") as tmp:
        tmp.write_text(config_pbtxt(name, batch, io, platform=platform))
    return folder


def _write_python_model(export_dir, manifest, repo, decl, max_batch, instances, runtime, prefix,
                        dynamic_batching, export_in_place, tile) -> Path:
    folder = Path(repo) / decl.name
    _clear_version(folder, keep="model.py")
    params = {"trtvae_model": decl.kind, "prefix": prefix, "runtime": runtime,
              "tile": "auto" if tile is None else tile}
    if export_in_place:
        params["export_dir"] = str(Path(export_dir).resolve())
    else:
        _copy_export(export_dir, manifest, decl.component, folder / "1" / "export")
    with atomic_path(folder / "1" / "model.py") as tmp:
        tmp.write_text(MODEL_PY)
    io = {"input": {"name": decl.input.name, "dtype": decl.input.dtype, "dims": list(decl.input.dims)},
          "output": {"name": decl.output.name, "dtype": decl.output.dtype, "dims": list(decl.output.dims)}}
    with atomic_path(folder / "config.pbtxt") as tmp:
        tmp.write_text(config_pbtxt(decl.name, max_batch, io, backend="python", instances=instances,
                                    parameters=params, dynamic_batching=dynamic_batching))
    return folder


def _copy_export(export_dir, manifest: dict, component: str, dest: Path) -> None:
    """The manifest, narrowed to one component, and that component's files (hard links where possible)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    entry = manifest["components"][component]
    keys = ["onnx"] + (["engine"] if "engine" in entry else [])
    files = []
    sources = [component_file(export_dir, manifest, component, key=key) for key in keys]  # sha256 checked
    # Exact tiling's segment graphs travel with their component (the runtime checks their sha256 on load).
    sources += [Path(export_dir) / step["file"] for step in entry.get("segments", {}).get("steps", [])]
    for source in sources:
        relative = source.relative_to(export_dir)  # as the manifest names it, so the copy resolves the same
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(source, target)
        files.append(str(relative))
    narrowed = {**manifest, "components": {component: entry}, "files": sorted(files)}
    write_manifest(dest, narrowed)


def _clear_version(folder: Path, keep: str) -> None:
    """Remove what a repository written earlier for another backend left in the version folder."""
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    for other in ("model.plan", "model.onnx", "model.py"):
        if other != keep:
            (version / other).unlink(missing_ok=True)
    if keep != "model.py":
        shutil.rmtree(version / "export", ignore_errors=True)
