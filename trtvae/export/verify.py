"""Accuracy of an exported runtime against the PyTorch fp32 reference of the same weights.

The reference runs through diffusers' own `AutoencoderKL.decode` / `.encode`, in fp32,
outside autocast (autocast would run its convolutions in reduced precision). Results are
collected into a report first and judged after (`verify_export`), as Polygraphy's comparator does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.table import Table

from .. import defaults
from ..components import DECODER, ENCODER, ComponentSpec
from ..errors import VerificationError
from ..latents import unscale
from ..manifest import has_engines
from ..metrics import REL_L2_THRESHOLD, ErrorStats, compare, passes
from .progress import console, stage



@dataclass
class CheckRow:
    component: str
    tensor: str
    shape: tuple
    stats: ErrorStats
    ok: bool
    backend: str = "onnxruntime"


@dataclass
class VerifyReport:
    precision: str
    rows: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "threshold_rel_l2": REL_L2_THRESHOLD[self.precision],
            "passed": self.passed,
            "checks": [
                {"component": r.component, "tensor": r.tensor, "backend": r.backend, "shape": list(r.shape),
                 **r.stats.as_dict(), "ok": r.ok}
                for r in self.rows
            ],
        }

    def table(self) -> Table:
        t = Table(title=f"Accuracy vs PyTorch fp32 ({self.precision}: rel L2 ≤ {REL_L2_THRESHOLD[self.precision]:g}, "
                        "no NaN/inf)")
        for col in ("check", "backend", "input shape", "max abs", "rel L2", "PSNR dB", "NaN/inf", ""):
            t.add_column(col, justify="left" if col in ("check", "backend", "input shape") else "right",
                         no_wrap=True)
        for r in self.rows:
            psnr = "" if r.stats.psnr_db is None else f"{r.stats.psnr_db:.1f}"
            t.add_row(r.tensor, r.backend, "×".join(map(str, r.shape)), f"{r.stats.max_abs:.3g}",
                      f"{r.stats.rel_l2:.2e}", psnr, str(r.stats.nonfinite),
                      "[green]ok[/]" if r.ok else "[red]FAIL[/]")
        return t

    def failures(self) -> list:
        return [r for r in self.rows if not r.ok]


def sample_latents(vae_config, batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    """What a pipeline feeds decode: unit-variance latents, unscaled (and shifted) as the pipeline does."""
    g = torch.Generator().manual_seed(seed)
    return unscale(torch.randn(batch, vae_config["latent_channels"], h, w, generator=g), vae_config)


def sample_images(batch: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth images in [-1, 1]: upsampled noise plus gradients, closer to photos than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, max(height // 16, 2), max(width // 16, 2), generator=g) * 2 - 1
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    ramp = torch.linspace(-0.5, 0.5, width).view(1, 1, 1, width)
    return (0.8 * smooth + ramp).clamp(-1, 1)


@contextlib.contextmanager
def strict_fp32():
    """No autocast and no TF32 on CUDA: the reference must be plain fp32 (TF32 alone is ~1e-3 off)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def reference(vae, component: str, x: torch.Tensor):
    with torch.autocast(x.device.type, enabled=False), strict_fp32():
        if component == DECODER:
            return vae.decode(x.float()).sample
        return vae.encode(x.float()).latent_dist


def verify_runtime(vae, runtime, specs: dict, precision: str, components=(DECODER, ENCODER),
                   latent_shapes=defaults.VERIFY_LATENT_SHAPES, report: VerifyReport | None = None,
                   grid_path=None) -> VerifyReport:
    """Run `runtime` and the fp32 reference at several shapes; append one row per checked tensor.

    With `grid_path`, also draw the decoder's first image per shape: reference, result, difference.
    """
    report = report or VerifyReport(precision)
    config = vae.config
    grid = []
    for i, (b, h, w) in enumerate(latent_shapes):
        if DECODER in components:
            z = sample_latents(config, b, h, w, seed=i)
            out = runtime.decode(z).sample
            ref = reference(vae, DECODER, z)
            _add(report, precision, specs[DECODER], "decoder sample", z.shape, compare(out, ref, image=True), runtime)
            grid.append(("latent " + "×".join(map(str, z.shape)), ref[0].float().numpy(), out[0].float().cpu().numpy()))
        if ENCODER in components:
            spec: ComponentSpec = specs[ENCODER]
            f = spec.downscale
            x = sample_images(b, spec.in_channels, h * f, w * f, seed=i)
            dist = runtime.encode(x).latent_dist
            ref = reference(vae, ENCODER, x)
            _add(report, precision, spec, "encoder mean", x.shape, compare(dist.mean, ref.mean), runtime)
            _add(report, precision, spec, "encoder logvar", x.shape, compare(dist.logvar, ref.logvar), runtime)
    if grid_path is not None and grid:
        from .plots import plot_verify_grid

        plot_verify_grid(grid_path, grid, title=f"decoder: PyTorch fp32 vs {report.precision} "
                                                f"({getattr(runtime, 'backend', type(runtime).__name__)})")
    return report


def _add(report, precision, spec, tensor, shape, stats, runtime):
    report.rows.append(CheckRow(spec.name, tensor, tuple(shape), stats, passes(stats, precision),
                                getattr(runtime, "backend", type(runtime).__name__)))


# The PyTorch fp32 reference's peak activation memory, per image pixel and per channel of the widest
# full-resolution stage (decoder: block_out_channels[1], what its last upsampler emits; encoder:
# block_out_channels[0]). Measured as the slope of peak memory between 128² and 256² images for the
# SDXL-architecture VAE, one image, eager PyTorch under no_grad (CPU peak RSS): decoder 4458 B/pixel
# over 256 channels = 17.4, encoder 2533 B/pixel over 128 channels = 19.8. Rounded up.
REF_BYTES_PER_PIXEL_CHANNEL = 20
# Share of the free device memory the reference may plan on: cuDNN workspaces and the allocator's
# fragmentation come on top of the tensors themselves.
REF_MEMORY_SHARE = 0.8


def reference_bytes(config, spec: ComponentSpec, input_shape) -> int:
    """Device memory the fp32 reference needs for ONE image of `input_shape` (it runs sliced)."""
    _, _, h, w = input_shape
    pixels = h * spec.upscale * w * spec.upscale  # image pixels: the decoder's output, the encoder's input
    widths = list(config["block_out_channels"])
    channels = widths[min(1, len(widths) - 1)] if spec.name == DECODER else widths[0]
    need = REF_BYTES_PER_PIXEL_CHANNEL * channels * pixels
    if config.get("mid_block_add_attention", True):  # fp32 scores, if attention falls back to its math kernel
        latent = pixels // (2 ** (len(widths) - 1)) ** 2
        need += 4 * latent * latent
    return int(need)


def reference_shapes(free_bytes: int, profile: dict, spec: ComponentSpec, config) -> tuple[list, list]:
    """Which input shapes of one engine profile to check against the reference, and a note per skipped one.

    Only as large as needed: the profile's min, its opt and an off-grid size between them, then its max;
    each only where one image's reference fits in `free_bytes` (REF_MEMORY_SHARE of it).
    """
    from ..profiles import verify_shapes

    picks = verify_shapes(profile, spec.input_multiple)  # min, opt, max, off-grid below opt, off-grid above
    wanted = [picks[0], picks[1], *picks[3:4], picks[2]]
    shapes, notes = [], []
    for shape in dict.fromkeys(tuple(s) for s in wanted):
        need = reference_bytes(config, spec, shape)
        if need <= REF_MEMORY_SHARE * free_bytes:
            shapes.append(shape)
        else:
            notes.append(f"{spec.name} at {'×'.join(map(str, shape))} not checked: its fp32 reference needs about "
                         f"{need / 2**30:.1f} GiB per image, {free_bytes / 2**30:.1f} GiB free on the GPU")
    return shapes, notes


def _sliced(ref_vae, name: str, x: torch.Tensor):
    """The reference one image at a time, each result moved to the CPU: memory for one image only."""
    if name == DECODER:
        return torch.cat([reference(ref_vae, name, x[i:i + 1]).cpu() for i in range(x.shape[0])])
    means, logvars = [], []
    for i in range(x.shape[0]):
        dist = reference(ref_vae, name, x[i:i + 1])
        means.append(dist.mean.cpu())
        logvars.append(dist.logvar.cpu())
    return torch.cat(means), torch.cat(logvars)


def verify_engines(vae, trt_vae, specs: dict, precision: str, components, report: VerifyReport, ort_vae=None,
                   notes: list | None = None):
    """TensorRT at the shapes `reference_shapes` picks per profile, vs PyTorch fp32 (and ONNX Runtime).

    The reference runs on the engine's GPU in fp32, sliced (a 1536² decode on the CPU would take minutes);
    a shape whose reference does not fit the free memory is skipped with a note (appended to `notes`).
    """
    import copy

    device = trt_vae.device
    weights = sum(p.numel() * 4 for p in vae.parameters())
    free = max(0, torch.cuda.mem_get_info(device)[0] - weights)
    ref_vae = copy.deepcopy(vae).to(device)
    config = vae.config
    for name in components:
        spec = specs[name]
        for p, profile in enumerate(trt_vae.profiles.get(name, [])):
            shapes, skipped = reference_shapes(free, profile, spec, config)
            for note in skipped:
                console.print(f"[yellow]! {note}[/]")
            if notes is not None:
                notes.extend(skipped)
            for i, shape in enumerate(shapes):
                b, _, h, w = shape
                if name == DECODER:
                    x = sample_latents(config, b, h, w, seed=100 + i).to(device)
                    out = trt_vae.decode(x).sample
                    _add(report, precision, spec, f"decoder sample p{p}", x.shape,
                         compare(out, _sliced(ref_vae, name, x), image=True), trt_vae)
                    if ort_vae is not None:
                        _add(report, precision, spec, f"decoder vs ORT p{p}", x.shape,
                             compare(out, ort_vae.decode(x).sample, image=True), trt_vae)
                else:
                    x = sample_images(b, spec.in_channels, h, w, seed=100 + i).to(device)
                    dist = trt_vae.encode(x).latent_dist
                    mean, logvar = _sliced(ref_vae, name, x)
                    _add(report, precision, spec, f"encoder mean p{p}", x.shape, compare(dist.mean, mean), trt_vae)
                    _add(report, precision, spec, f"encoder logvar p{p}", x.shape, compare(dist.logvar, logvar),
                         trt_vae)
                    if ort_vae is not None:
                        _add(report, precision, spec, f"encoder vs ORT p{p}", x.shape,
                             compare(dist.mean, ort_vae.encode(x).latent_dist.mean), trt_vae)
    del ref_vae
    return report


def verify_export(vae, out, manifest: dict, specs: dict, precision: str, components, grid_path=None) -> dict:
    """Every runtime that can run the export here against the reference; the manifest's `verify` record.

    Raises VerificationError (so no manifest is written) when a check misses its threshold.
    """
    from ..runtime.ort import OrtVae

    notes = []
    try:
        ort_cpu = OrtVae(out, manifest, providers=["CPUExecutionProvider"])
    except (ImportError, ValueError) as e:
        ort_cpu = None
        notes.append(f"onnxruntime: {e}")
    engines_built = has_engines(manifest)
    if ort_cpu is None and not engines_built:
        console.print(f"[yellow]! verify not run:[/] {notes[0]}")
        return {"status": "not_run", "reason": notes[0]}
    report = VerifyReport(precision)
    with stage("verify vs PyTorch fp32") as info:
        if ort_cpu is not None:
            verify_runtime(vae, ort_cpu, specs, precision, components=components, report=report, grid_path=grid_path)
        if engines_built:
            from ..runtime.trt import TRTVae

            ort_gpu = _ort_cuda(out, manifest, notes)
            verify_engines(vae, TRTVae(out, manifest), specs, precision, components, report, ort_gpu, notes)
        info["detail"] = f"{len(report.rows)} checks"
    console.print(report.table())
    for note in notes:
        console.print(f"[yellow]! not compared:[/] {note}")
    if not report.passed:
        worst = report.failures()[0]
        raise VerificationError(
            f"{len(report.failures())} accuracy check(s) failed, e.g. {worst.tensor} ({worst.backend}) at "
            f"{'×'.join(map(str, worst.shape))}: rel L2 {worst.stats.rel_l2:.2e}, {worst.stats.nonfinite} NaN/inf. "
            "No manifest was written"
        )
    return {"status": "passed", **report.as_dict(), **({"not_compared": notes} if notes else {})}


def _ort_cuda(out, manifest: dict, notes: list):
    """ONNX Runtime on the GPU, to compare engines with at full size; None (noted) where it is missing."""
    from ..runtime.ort import OrtVae

    try:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise ImportError("TensorRT vs ONNX Runtime needs onnxruntime-gpu (CUDAExecutionProvider)")
        return OrtVae(out, manifest, providers=["CUDAExecutionProvider"])
    except (ImportError, ValueError) as e:
        notes.append(str(e))
        return None
