"""TensorRT plans for exact tiling's segment graphs: one per ONNX segment, built as the component engines are.

Each plan has one profile (profiles.segment_profile): a tiled step's windows have one side, so its
profile is tuned at the window it runs (opt = max) and builds fast; the latent-resolution steps take
any size up to defaults.EXACT_MAX_IMAGE_SIDE. The runtime clamps its tile to the plans' windows.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.markup import escape

from ..errors import ExportError, first_line
from ..profiles import exact_sizes, segment_batch, segment_profile
from ..runtime.segments import read_steps, resolution_ratios
from .engine import EngineOptions, build_plan
from .progress import console


def segment_plan_name(onnx_name: str) -> str:
    return Path(onnx_name).with_suffix(".plan").name


def segment_profiles(manifest: dict, component: str, spec, options: EngineOptions) -> list:
    """[{input name: {"min", "opt", "max"}}] of each segment plan of `component`, in step order."""
    segments = manifest["components"][component]["segments"]
    core, max_side, multiple = exact_sizes(manifest["vae_config"], spec, manifest["spatial_factor"])
    batch = segment_batch(options.profiles)
    ratios = resolution_ratios(read_steps(segments))
    return [segment_profile(step, ratio, batch, core, max_side, multiple)
            for step, ratio in zip(segments["steps"], ratios)]


def build_segment_plans(folder: Path, manifest: dict, component: str, spec, options: EngineOptions) -> bool:
    """Build a plan beside each segment graph of `component`; record it in the step's manifest entry ("engine").

    A plan TensorRT cannot build costs exact tiling on TensorRT, not the export: the component's plans are
    removed, the reason is recorded ("plans_error", which TRTVae reports) and the export goes on. Returns
    whether every plan was built.
    """
    segments = manifest["components"][component]["segments"]
    for step, shapes in zip(segments["steps"], segment_profiles(manifest, component, spec, options)):
        plan = folder / segment_plan_name(step["file"])
        io_types = {t["name"]: t["dtype"] for t in step["inputs"] + step["outputs"]}
        start = time.perf_counter()
        try:
            step["engine"] = build_plan(folder / step["file"], plan, f"{component} segment {step['name']} plan",
                                        [shapes], io_types, options, monitor=False)
        except ExportError as e:
            for built in segments["steps"]:
                if built.pop("engine", None) is not None:
                    (folder / segment_plan_name(built["file"])).unlink(missing_ok=True)
            segments["plans_error"] = first_line(e, 300)
            console.print(f"[yellow]! no TensorRT plans for the {component} segment graphs (exact tiling on "
                          f"TensorRT; OrtVae still tiles exactly):[/] {escape(segments['plans_error'])}",
                          soft_wrap=True)
            return False
        console.print(f"    [dim]{plan.name} ({step['name']}): {time.perf_counter() - start:.1f} s[/]")
    return True
