"""TensorRT plans for exact tiling's segment graphs: one per ONNX segment, built as the component engines are.

Each plan has one profile (profiles.segment_profile): a tiled step's windows have one side, so its
profile is tuned at the window it runs (opt = max) and builds fast; the latent-resolution steps take
any size up to defaults.EXACT_MAX_IMAGE_SIDE. The runtime clamps its tile to the plans' windows.
"""
from __future__ import annotations

import time
from pathlib import Path

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


def build_segment_plans(folder: Path, manifest: dict, component: str, spec, options: EngineOptions) -> None:
    """Build a plan beside each segment graph of `component`; record it in the step's manifest entry ("engine")."""
    steps = manifest["components"][component]["segments"]["steps"]
    for step, shapes in zip(steps, segment_profiles(manifest, component, spec, options)):
        plan = folder / segment_plan_name(step["file"])
        io_types = {t["name"]: t["dtype"] for t in step["inputs"] + step["outputs"]}
        start = time.perf_counter()
        step["engine"] = build_plan(folder / step["file"], plan, f"{component} segment {step['name']} plan",
                                    [shapes], io_types, options, monitor=False)
        console.print(f"    [dim]{plan.name} ({step['name']}): {time.perf_counter() - start:.1f} s[/]")
