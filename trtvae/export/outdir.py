"""The output folder's life: what an export writes there, and how a re-export clears the last one.

The old manifest goes first (an interrupted re-export never looks finished), then the old outputs,
and the new manifest is written last. Only a folder an export has written to (manifest or marker)
is cleaned; anything else holding such names is refused.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .. import defaults
from ..components import COMPONENTS
from ..errors import OptionError
from ..manifest import MANIFEST_NAME, read_manifest, referenced_files
from .fp16.report import AUDIT_JSON, AUDIT_PNG

VERIFY_PNG = "verify_decoder.png"
# Everything an export may write besides the manifest; timing.cache is not among them: it is meant to outlive exports.
EXTRA_OUTPUTS = (AUDIT_JSON, AUDIT_PNG, VERIFY_PNG)
EXPORT_MARKER = ".trtvae-export"  # says a folder is an export's, finished or not, so it may be cleaned


def default_out(name: str) -> Path:
    return Path(defaults.OUT_ROOT) / name


def output_names() -> set:
    return {f"{c}.{ext}" for c in COMPONENTS for ext in ("onnx", "plan")} | set(EXTRA_OUTPUTS)


def present_outputs(out: Path) -> list:
    return sorted(n for n in output_names() if (Path(out) / n).exists())


def begin_rewrite(out: Path) -> None:
    """Remove the old manifest, then every old output: nothing of an earlier export is mistaken for this one's."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    manifest_path, marker = out / MANIFEST_NAME, out / EXPORT_MARKER
    present = present_outputs(out)
    if present and not (manifest_path.exists() or marker.exists()):
        raise OptionError(f"--out {out} holds {', '.join(present)} but is not a trtvae export folder; "
                          "choose an empty or new folder")
    old = set()
    if manifest_path.exists():
        with contextlib.suppress(Exception):
            old = referenced_files(read_manifest(out))
        manifest_path.unlink()
    marker.touch()
    for name in ({n for n in old if Path(n).name == n} | output_names()):  # never outside `out`
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
