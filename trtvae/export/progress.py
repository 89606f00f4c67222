"""Stage logging for long work: a spinner while it runs, then one line with its time, size and path."""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.filesize import decimal

# Logs and CI have no terminal; rich would wrap tables at 80 columns there.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


# (stage title, seconds) of every finished stage in this process, for benchmarks and logs.
timings: list = []


@contextlib.contextmanager
def stage(title: str):
    """Run a stage; the body may set info["path"] and info["detail"] for the closing line."""
    info: dict = {}
    start = time.perf_counter()
    try:
        with console.status(f"{title}…"):
            yield info
    except BaseException:
        console.print(f"[red]✗[/] {title:<30} failed after {time.perf_counter() - start:.1f} s")
        raise
    took = time.perf_counter() - start
    parts = [f"[green]✓[/] {title:<30} {took:6.1f} s"]
    path = info.get("path")
    if path is not None and Path(path).is_file():
        parts.append(f"{decimal(Path(path).stat().st_size):>9}  {path}")
    if info.get("detail"):
        parts.append(str(info["detail"]))
    console.print("  ".join(parts))
    info["seconds"] = took
    timings.append((title, took))
