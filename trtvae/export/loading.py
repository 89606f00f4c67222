"""Where a VAE comes from: `demo`, a Hub repo id, a local diffusers folder, or one .safetensors file.

`load_vae` decides which of them `model` is and reads it; the family it belongs to is asked of
families.py once (by its config, or by the architecture a weights file's tensors hold, which
checkpoint.py reads). Every source ends as an fp32 `AutoencoderKL` in eval mode on the CPU, plus a
description of where it came from for the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from rich.markup import escape

from .. import defaults
from ..errors import ModelLoadError, first_line
from ..files import sha256_file
from . import checkpoint, families
from .progress import console

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
    source: dict = field(default_factory=dict)  # kind, model, family, weights_sha256: goes into the manifest

    @property
    def family(self) -> str | None:
        return self.source.get("family")


def load_vae(model: str = defaults.MODEL, allow_pickle: bool = False, subfolder: str | None = None,
             family: str | None = None) -> LoadedVae:
    """Load `model`; `family` (families.NAMES) says what weights alone cannot: which latent scale it has."""
    families.check_name(family)
    if model == DEMO:
        return load_demo(family=family or families.DEFAULT)
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return _load_folder(path, allow_pickle, family=family)
    if path.is_file():
        return _load_single_file(path, allow_pickle, family)
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model path {model!r} does not exist")
    return _load_hub(model, allow_pickle, subfolder, family)


def peek_config(model: str, subfolder: str | None = None, family: str | None = None) -> dict | None:
    """The model's config without reading weights, where that costs nothing (no download); else None.

    A single file's architecture is in its tensors, so it has none to peek at.
    """
    if model == DEMO:
        return families.family_config(family or families.DEFAULT)
    path = Path(os.path.expanduser(model))
    if path.is_file():
        return None
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            try:
                config = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                return None  # load_vae reports it properly
            return config if isinstance(config, dict) and "block_out_channels" in config else None
    return None


def load_demo(seed: int = 0, family: str = families.DEFAULT) -> LoadedVae:
    """A family's exact VAE architecture (default SDXL's) with seeded random weights: offline, deterministic."""
    config = families.family_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(config)
    vae = vae.eval().requires_grad_(False)
    name = DEMO if family == families.DEFAULT else f"{DEMO}-{family}"
    return LoadedVae(vae, name, {"kind": "demo", "model": DEMO, "family": family, "seed": seed,
                                 **_declared(config), "weights_sha256": state_dict_sha256(vae)})


def _declared(config: dict) -> dict:
    # The manifest's vae_config says force_upcast false (the graphs have a fixed precision);
    # what the source itself declared is kept here: true is its authors' "fp16 is unsafe".
    return {"force_upcast": bool(families.effective(config, "force_upcast"))}


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
                 model: str | None = None, family: str | None = None) -> LoadedVae:
    name = name or folder.resolve().name  # the folder the user named, not its vae/ subfolder
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a whole pipeline folder: take its VAE
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ModelLoadError(f"{folder}/config.json describes a {config['_class_name']}, expected AutoencoderKL")
    family = families.family_of_config(config, family, f"{folder}/config.json")
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
        {"kind": kind, "model": model or str(folder.resolve()), "family": family,
         **_declared(config), "weights_file": weights.name, "weights_sha256": sha256_file(weights)},
    )


def _load_single_file(path: Path, allow_pickle: bool, family: str | None) -> LoadedVae:
    ckpt = checkpoint.parse(_read_state(path, allow_pickle))
    if ckpt.dropped:
        console.print(f"[yellow]![/] {escape(path.name)}: ignoring {len(ckpt.dropped)} tensors that training leaves "
                      f"behind ({', '.join(sorted({k.split('.')[0] + '.*' for k in ckpt.dropped}))})")
    family, config, notes, assumed = families.family_of_file(ckpt.architecture, family, path.name)
    for note in notes:
        console.print(f"[yellow]![/] {escape(note)}")
    checkpoint.check(ckpt, config)
    try:  # the family's published config, with the architecture read from the tensors
        vae = AutoencoderKL.from_single_file(ckpt.state, config=families.config_path(family),
                                             torch_dtype=torch.float32, **ckpt.architecture)
    except (ValueError, RuntimeError) as e:  # the check passed, so this is a loading gap, not the user's file
        raise ModelLoadError(f"{path.name}: its tensors fit the {family} architecture but could not be loaded: "
                             f"{first_line(e, 300)}") from e
    return LoadedVae(
        vae.eval().requires_grad_(False),
        path.stem,
        {"kind": "file", "model": str(path.resolve()), "family": family,
         "family_assumed": assumed,
         "key_names": ckpt.key_names, **_declared(config), "weights_sha256": sha256_file(path)},
    )


def _read_state(path: Path, allow_pickle: bool) -> dict:
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(f"{path.name} is a pickle checkpoint: {_PICKLE_WHY}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path.name}: expected a .safetensors file (or a diffusers folder)")
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"could not read {path}: {e}") from e


def _load_hub(repo_id: str, allow_pickle: bool, subfolder: str | None, family: str | None) -> LoadedVae:
    from huggingface_hub import snapshot_download

    prefixes = [f"{subfolder}/"] if subfolder else ["", "vae/"]
    suffixes = [".safetensors", *(PICKLE_SUFFIXES if allow_pickle else ())]
    patterns = [f"{p}config.json" for p in prefixes]
    patterns += [f"{p}diffusion_pytorch_model*{s}" for p in prefixes for s in suffixes]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, not cached, not found, gated: one line, not a traceback
        reason = first_line(e)
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else ""
        raise ModelLoadError(
            f"could not get {repo_id!r} from the Hugging Face Hub or its local cache{offline}: {reason[:200]}. "
            f"Pass a local diffusers folder or .safetensors file with --model, or try --model demo"
        ) from None
    folder = local / subfolder if subfolder else local
    return _load_folder(folder, allow_pickle, name=repo_id.split("/")[-1], kind="hub", model=repo_id, family=family)
