"""Where a VAE comes from: `demo`, a Hub repo id, a local diffusers folder, or one .safetensors file.

Every source ends as an fp32 `AutoencoderKL` in eval mode on the CPU, plus a description
of where it came from for the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .. import defaults
from ..errors import ModelLoadError
from ..files import sha256_file

DEMO = "demo"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_PICKLE_WHY = (
    "pickle checkpoints can run arbitrary code when loaded; convert it to .safetensors, "
    "or pass --allow-pickle if you trust its source"
)


@dataclass
class LoadedVae:
    vae: AutoencoderKL
    name: str  # short name, used for the default output folder
    source: dict = field(default_factory=dict)  # kind, model, weights_sha256: goes into the manifest


def sdxl_vae_config() -> dict:
    """The SDXL VAE architecture, shipped so single files and `demo` need no download."""
    text = resources.files("trtvae.export").joinpath("configs/sdxl_vae.json").read_text()
    return json.loads(text)


def load_vae(model: str = defaults.MODEL, allow_pickle: bool = False, subfolder: str | None = None) -> LoadedVae:
    if model == DEMO:
        return load_demo()
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return _load_folder(path, allow_pickle)
    if path.is_file():
        return _load_single_file(path, allow_pickle)
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model path {model!r} does not exist")
    return _load_hub(model, allow_pickle, subfolder)


def peek_config(model: str, subfolder: str | None = None) -> dict | None:
    """The model's config without reading weights, where that costs nothing (no download); else None."""
    if model == DEMO:
        return sdxl_vae_config()
    path = Path(os.path.expanduser(model))
    if path.is_file():
        return sdxl_vae_config() if path.suffix == ".safetensors" else None
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            try:
                config = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                return None  # load_vae reports it properly
            return config if isinstance(config, dict) and "block_out_channels" in config else None
    return None


def load_demo(seed: int = 0) -> LoadedVae:
    """The exact SDXL-VAE architecture with seeded random weights: offline, deterministic."""
    config = sdxl_vae_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(config)
    vae = vae.eval().requires_grad_(False)
    return LoadedVae(vae, DEMO, {"kind": "demo", "model": DEMO, "seed": seed, "weights_sha256": state_dict_sha256(vae)})


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Content hash of weights held only in memory, one tensor at a time."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _find_weights(folder: Path, allow_pickle: bool) -> tuple[Path, str | None]:
    """The weights file in a diffusers folder, and the variant its name implies."""
    candidates = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not candidates:
        pickles = sorted(p for p in folder.glob("diffusion_pytorch_model*") if p.suffix in PICKLE_SUFFIXES)
        if pickles and not allow_pickle:
            raise ModelLoadError(f"{folder} holds only {pickles[0].name}: {_PICKLE_WHY}")
        candidates = pickles
    if not candidates:
        raise ModelLoadError(f"{folder} has a config.json but no diffusion_pytorch_model*.safetensors weights")
    plain = [p for p in candidates if p.stem == "diffusion_pytorch_model"]
    weights = plain[0] if plain else candidates[0]
    parts = weights.stem.split(".")
    return weights, (parts[1] if len(parts) > 1 else None)


def _load_folder(folder: Path, allow_pickle: bool, name: str | None = None, kind: str = "folder",
                 model: str | None = None) -> LoadedVae:
    name = name or folder.resolve().name  # the folder the user named, not its vae/ subfolder
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a whole pipeline folder: take its VAE
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ModelLoadError(f"{folder}/config.json describes a {config['_class_name']}, expected AutoencoderKL")
    weights, variant = _find_weights(folder, allow_pickle)
    try:
        vae = AutoencoderKL.from_pretrained(
            folder, variant=variant, use_safetensors=weights.suffix == ".safetensors", torch_dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"could not load the VAE from {folder}: {e}") from e
    return LoadedVae(
        vae.eval().requires_grad_(False),
        name,
        {"kind": kind, "model": model or str(folder.resolve()), "weights_file": weights.name,
         "weights_sha256": sha256_file(weights)},
    )


def _load_single_file(path: Path, allow_pickle: bool) -> LoadedVae:
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(f"{path.name} is a pickle checkpoint: {_PICKLE_WHY}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"could not read {path}: {e}") from e
    else:
        raise ModelLoadError(f"{path.name}: expected a .safetensors file (or a diffusers folder)")
    config = sdxl_vae_config()
    if not any(k.startswith(("decoder.up_blocks.", "encoder.down_blocks.")) for k in state):
        # Original (LDM / ComfyUI / A1111) key names, possibly under a `first_stage_model.` prefix.
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, config)
    vae = AutoencoderKL.from_config(config)
    try:
        vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{path.name} does not match the SDXL VAE architecture (single files are loaded with the "
            f"built-in SDXL-VAE config; use a diffusers folder for other VAEs): {str(e).splitlines()[0]}"
        ) from e
    return LoadedVae(
        vae.eval().requires_grad_(False),
        path.stem,
        {"kind": "file", "model": str(path.resolve()), "weights_sha256": sha256_file(path)},
    )


def _load_hub(repo_id: str, allow_pickle: bool, subfolder: str | None) -> LoadedVae:
    from huggingface_hub import snapshot_download

    prefixes = [f"{subfolder}/"] if subfolder else ["", "vae/"]
    suffixes = [".safetensors", *(PICKLE_SUFFIXES if allow_pickle else ())]
    patterns = [f"{p}config.json" for p in prefixes]
    patterns += [f"{p}diffusion_pytorch_model*{s}" for p in prefixes for s in suffixes]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, not cached, not found, gated: one line, not a traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else ""
        raise ModelLoadError(
            f"could not get {repo_id!r} from the Hugging Face Hub or its local cache{offline}: {reason[:200]}. "
            f"Pass a local diffusers folder or .safetensors file with --model, or try --model demo"
        ) from None
    folder = local / subfolder if subfolder else local
    return _load_folder(folder, allow_pickle, name=repo_id.split("/")[-1], kind="hub", model=repo_id)
