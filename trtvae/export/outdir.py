"""The output folder's life: an export is built in a staging folder beside --out and swapped in whole.

Invariants:
- Nothing under --out is written before the new export is complete (manifest written in the staging
  folder). Then two renames on one file system replace it: --out → `.<name>.old-<pid>`, staging →
  --out; the old folder is removed after. A signal during the swap is noted, not acted on.
- A failure or a signal (SIGINT, and SIGTERM, which raises KeyboardInterrupt while an export runs)
  at any earlier point leaves --out byte for byte as it was, and the staging folder is removed. One that
  Python could not raise (it landed in a weakref callback or a __del__) is noted and stops the swap.
- Only a trtvae export folder (manifest or marker) or an empty folder is replaced. Entries of it that
  no export writes (a user's notes, a Triton repository) are moved into the new folder.
- `timing.cache` and its record are copied into the staging folder first and come back with the swap.
- A process reading the old export (`vae-export serve`) keeps the files it has open: a rename or an
  unlink does not invalidate an open file. It serves the old export until it is restarted.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from .. import defaults
from ..components import COMPONENTS
from ..errors import OptionError
from ..manifest import MANIFEST_NAME, read_manifest, referenced_files
from .engine import STALE_TIMING_CACHE, TIMING_CACHE, TIMING_CACHE_RECORD
from .fp16.report import AUDIT_JSON, AUDIT_PNG
from .progress import console

VERIFY_PNG = "verify_decoder.png"
# Everything an export may write besides the manifest and the timing cache.
EXTRA_OUTPUTS = (AUDIT_JSON, AUDIT_PNG, VERIFY_PNG)
EXPORT_MARKER = ".trtvae-export"  # says a folder is an export's, finished or not, so it may be replaced
INSPECT_MARKER = "NOT-AN-EXPORT.txt"  # in a failed export's files, kept for inspection only
# Outlive exports: carried into the staging folder, so a rebuild reuses the timing cache.
CARRIED = (TIMING_CACHE, TIMING_CACHE_RECORD, STALE_TIMING_CACHE)


def default_out(name: str) -> Path:
    return Path(defaults.OUT_ROOT) / name


def output_names() -> set:
    return {f"{c}.{ext}" for c in COMPONENTS for ext in ("onnx", "plan")} | set(EXTRA_OUTPUTS)


def present_outputs(out: Path) -> list:
    return sorted(n for n in output_names() if (Path(out) / n).exists())


def is_export(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).exists() or (folder / EXPORT_MARKER).exists()


def check_replaceable(out: Path) -> None:
    """Refuse an --out that a re-export must not replace: a file, a mount point, someone else's folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OptionError(f"--out {out} is a file; choose a folder")
    if os.path.ismount(out):
        raise OptionError(f"--out {out} is a mount point: an export replaces its folder by renaming; "
                          "choose a folder inside it")
    if not is_export(out) and any(out.iterdir()):
        raise OptionError(f"--out {out} is not empty and is not a trtvae export folder (no {MANIFEST_NAME}); "
                          "choose an empty or new folder")


def _export_names(folder: Path) -> set:
    """What an export (this one or the one in `folder`) writes: everything else in `folder` is the user's."""
    names = output_names() | {MANIFEST_NAME, EXPORT_MARKER, *CARRIED, f"{TIMING_CACHE}.lock"}
    with contextlib.suppress(Exception):
        names |= {n for n in referenced_files(read_manifest(folder)) if Path(n).name == n}
    return names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def signals_held(reraise: bool = True):
    """SIGINT/SIGTERM arriving in the block are noted, not acted on; after it, KeyboardInterrupt (if `reraise`).

    Python runs signal handlers in the main thread between bytecodes, whichever thread the OS chose,
    so a noting handler defers them reliably (a thread's signal mask would not: torch's threads take them).
    """
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    caught: list = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught and reraise:
            raise KeyboardInterrupt(signal.Signals(caught[0]).name)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


class Staging:
    """`with Staging(out) as st:` write into `st.path`; `st.commit()` swaps it in; leaving without it removes it."""

    def __init__(self, out: Path):
        out = Path(out)
        self.out = Path(os.path.realpath(out)) if out.is_symlink() else out  # replace the folder, not the link
        self.path: Path | None = None
        self.committed = False
        self._sigterm = None
        self._unraisablehook = None
        self.lost_interrupts: list = []

    def _note_unraisable(self, unraisable) -> None:
        # A signal landing in a weakref callback or a __del__ raises KeyboardInterrupt where Python cannot
        # propagate it: it would be printed as "Exception ignored" and the export would finish as if never
        # interrupted. Noted here, it stops the export at the swap instead.
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.lost_interrupts.append(unraisable.exc_value)
        else:
            self._unraisablehook(unraisable)

    def _sibling(self, kind: str) -> Path:
        return self.out.parent / f".{self.out.name}.{kind}-{os.getpid()}"

    def __enter__(self) -> "Staging":
        check_replaceable(self.out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptionError(f"--out {self.out}: cannot create {self.out.parent} ({e.strerror})") from None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
            self._unraisablehook, sys.unraisablehook = sys.unraisablehook, self._note_unraisable
        try:
            self._sweep()
            self.path = self._sibling("staging")
            with signals_held():
                if self.path.exists():
                    shutil.rmtree(self.path)
                self.path.mkdir()
            (self.path / EXPORT_MARKER).touch()
            for name in CARRIED:
                if (self.out / name).is_file():
                    shutil.copy2(self.out / name, self.path / name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        try:
            if not self.committed and self.path is not None and self.path.exists():
                with signals_held():
                    shutil.rmtree(self.path, ignore_errors=True)
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
            if self._unraisablehook is not None:
                sys.unraisablehook = self._unraisablehook
        return False

    def commit(self) -> None:
        """Put the finished staging folder in place of --out; carry over the user's own entries."""
        if self.lost_interrupts:
            raise KeyboardInterrupt(f"{self.lost_interrupts[0]} (noted while Python could not raise it)")
        with signals_held(reraise=False) as caught:
            old = None
            if self.out.exists():
                old = self._sibling("old")
                os.rename(self.out, old)
            try:
                os.rename(self.path, self.out)
            except OSError:
                if old is not None:
                    os.rename(old, self.out)
                raise
            self.committed = True
            if old is not None:
                theirs = sorted(n for n in set(os.listdir(old)) - _export_names(old) - _export_names(self.out)
                                if not (n.startswith(".") and n.endswith(".tmp")))  # an old half-written file
                for name in theirs:
                    os.rename(old / name, self.out / name)
                shutil.rmtree(old, ignore_errors=True)
        if caught:  # too late to stop: the export is finished and in place
            console.print(f"[yellow]! {signal.Signals(caught[0]).name} during the final swap: {self.out} holds "
                          "the new, finished export[/]")

    def keep_for_inspection(self) -> Path:
        """Move the staging folder's files to `<out>.inspect` (never a loadable export); return where."""
        target = self.out.parent / f"{self.out.name}.inspect"
        with signals_held():
            if target.exists() and (target / INSPECT_MARKER).exists():
                shutil.rmtree(target)
            if target.exists():
                target = self._sibling("inspect")
            (self.path / EXPORT_MARKER).unlink(missing_ok=True)
            (self.path / INSPECT_MARKER).write_text(
                f"Files of a failed export into {self.out}, kept for inspection only: not an export, "
                f"never loaded. {self.out} was left as it was. Safe to delete.\n")
            os.rename(self.path, target)
            self.committed = True  # nothing left to remove
        return target

    def _sweep(self) -> None:
        """Remove what an export killed outright (SIGKILL, power loss) left beside --out; undo a half swap."""
        for kind in ("old", "staging"):
            for p in sorted(self.out.parent.glob(f".{self.out.name}.{kind}-*")):
                pid = p.name.rsplit("-", 1)[-1]
                if not pid.isdigit() or _alive(int(pid)) or not is_export(p):
                    continue
                if kind == "old" and not self.out.exists():  # killed between the two renames
                    os.rename(p, self.out)
                    console.print(f"[yellow]! restored {self.out} from {p.name}, left by an interrupted export[/]")
                else:
                    shutil.rmtree(p, ignore_errors=True)
