"""`trtvae.attach(pipe, DIR)`: put an exported VAE into a diffusers pipeline in one call.

Chooses TensorRT when it can run here and ONNX Runtime otherwise, says which and why, and
fixes what the pipeline derived from its old VAE at construction (`vae_scale_factor` and
the image processors built from it). See docs/diffusers.md for what a pipeline cannot do
with a VAE that is not a torch Module.
"""
from __future__ import annotations

import logging
import warnings

from . import defaults
from .errors import first_line
from .runtime.base import VaeRuntime

logger = logging.getLogger("trtvae")

BACKENDS = defaults.RUNTIMES
_ALIASES = {"trt": "tensorrt", "ort": "onnxruntime"}


def load_runtime(directory, backend: str = "auto", trt_options: dict | None = None,
                 ort_options: dict | None = None) -> tuple[VaeRuntime, str]:
    """The runtime for the export in `directory`, and one line saying why it was chosen."""
    backend = _ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)} (or trt, ort)")
    if backend != "onnxruntime":
        try:
            from .runtime.trt import TRTVae

            vae = TRTVae.from_pretrained(directory, **(trt_options or {}))
            return vae, "TensorRT engine loaded"
        # What "cannot run here" looks like: no tensorrt module, no GPU, an engine built for
        # another GPU or TensorRT version, no engine in the export. Anything else is a bug and propagates.
        except (ImportError, RuntimeError, OSError, ValueError) as e:
            if backend == "tensorrt":
                raise
            reason = f"TensorRT not usable ({type(e).__name__}: {first_line(e)})"
    else:
        reason = "backend='onnxruntime' requested"
    from .runtime.ort import OrtVae

    vae = OrtVae.from_pretrained(directory, **(ort_options or {}))
    return vae, f"{reason}; using ONNX Runtime ({', '.join(vae.providers)})"


def attach(pipe, directory, backend: str = "auto", verbose: bool = True, trt_options: dict | None = None,
           ort_options: dict | None = None) -> VaeRuntime:
    """Replace `pipe.vae` with the export in `directory` and return the runtime.

    The choice and its reason are printed when `verbose` and always logged on the "trtvae" logger.

    Args:
        pipe: a diffusers pipeline (built with `vae=None` or with the PyTorch VAE it replaces).
        directory: the export folder (holding manifest.json).
        backend: "auto" (TensorRT when it can run, else ONNX Runtime), "tensorrt"/"trt" (fail if it
            cannot run) or "onnxruntime"/"ort".
        verbose: print which runtime was chosen and why.
        trt_options: keyword arguments for `TRTVae` (e.g. `device="cuda:1"`).
        ort_options: keyword arguments for `OrtVae` (e.g. `providers=[...]`).
    """
    vae, reason = load_runtime(directory, backend, trt_options, ort_options)
    message = f"trtvae: {type(vae).__name__} from {directory} ({reason})"
    logger.info(message)
    if verbose:
        print(message)
    _check_against_previous(getattr(pipe, "vae", None), vae)
    assumed = assumed_family_note(vae.manifest)
    if assumed:
        warnings.warn(assumed, stacklevel=2)
    pipe.vae = vae
    _sync_scale_factor(pipe, vae.spatial_factor)
    if getattr(pipe, "_all_hooks", None):
        warnings.warn("the pipeline has model CPU offload enabled; the VAE runtime is not a torch Module and is "
                      f"not offloaded: it stays on {vae.device}", stacklevel=2)
    return vae


def assumed_family_note(manifest: dict) -> str | None:
    """A warning when the export's family (so its latent scale) was assumed from a file, not given."""
    source = manifest.get("source", {})
    if not source.get("family_assumed"):
        return None
    scale = manifest.get("vae_config", {}).get("scaling_factor")
    return (f"this export's family {source.get('family')!r} (scaling_factor {scale}) was assumed, not given: "
            "its weights file cannot tell SD1.x/2.x from SDXL. If it is an SD1.x/2.x VAE, re-export with "
            "--family sd15, or latents will be scaled wrongly")


def _check_against_previous(old, new: VaeRuntime) -> None:
    """Warn when the export's latent space cannot be the one the pipeline was built for."""
    config = getattr(old, "config", None)
    if config is None:
        return
    for key in ("latent_channels", "scaling_factor", "shift_factor", "block_out_channels"):
        before, after = config.get(key), new.config.get(key)
        if before is not None and after is not None and list(_as_list(before)) != list(_as_list(after)):
            warnings.warn(f"the pipeline's previous VAE has {key}={before!r}, the export has {after!r}: "
                          "images will be wrong unless the export is of the VAE this pipeline was trained with",
                          stacklevel=3)


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def _sync_scale_factor(pipe, factor: int) -> None:
    # Pipelines compute these once in __init__, from the VAE they were given (8 when it was None).
    # An image processor may work at a multiple of the factor (FLUX packs 2×2 latents: factor × 2),
    # so each keeps its ratio to the pipeline's old factor.
    from diffusers.image_processor import VaeImageProcessor

    old = getattr(pipe, "vae_scale_factor", None)
    if old is not None and old != factor:
        pipe.vae_scale_factor = factor
    for name, value in list(vars(pipe).items()):
        if not isinstance(value, VaeImageProcessor):
            continue
        have = value.config.get("vae_scale_factor")
        want = factor * (have // old) if old and have and have % old == 0 else factor
        if have != want:
            setattr(pipe, name, type(value).from_config({**value.config, "vae_scale_factor": want}))
