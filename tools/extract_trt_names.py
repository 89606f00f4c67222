#!/usr/bin/env python3
"""Extract the public API names of the ``tensorrt`` Python module from a bindings wheel.

Usage::

    python tools/extract_trt_names.py WHEEL_OR_REQUIREMENT [-o OUT.json]

    # a local wheel file
    python tools/extract_trt_names.py /tmp/tensorrt_cu12_bindings-10.16.1.11-cp311-none-manylinux_2_28_x86_64.whl
    # or NAME==VERSION: fetched with `pip download --no-deps --only-binary=:all:` for
    # cp311 / manylinux x86_64 into a temporary directory
    python tools/extract_trt_names.py tensorrt-cu13-bindings==11.4.0.106 \
        -o tests/data/tensorrt_names/tensorrt-11.4.0.106.json

Without ``-o`` the output goes to ``tests/data/tensorrt_names/tensorrt-<version>.json``
(relative to the repository root); ``-o -`` writes to stdout.

Method (exact, no TensorRT needed)
----------------------------------
The ``tensorrt-cuXX-bindings`` wheels contain ``tensorrt_bindings/__init__.py`` and the
pybind11 extension ``tensorrt_bindings/tensorrt.so`` (no ``.pyi`` stubs are shipped).
The extension cannot normally be imported because it links against ``libnvinfer.so.N``,
``libnvonnxparser.so.N`` and ``libnvinfer_plugin.so.N``, which only come with the
TensorRT libraries (not on PyPI). This script therefore:

1. unpacks the wheel into a temporary directory;
2. reads the extension's ``NEEDED`` entries (``readelf -d``) and finds those that cannot
   be loaded on this machine (``ctypes.CDLL``);
3. lists the extension's undefined dynamic symbols (``nm -D --undefined-only``), drops
   weak and symbol-versioned ones (glibc/libstdc++) and those that the running Python
   process or the present NEEDED libraries already resolve (the ``Py*`` C-API, libc...),
   leaving the TensorRT entry points (``createInferBuilder_INTERNAL``,
   ``createInferRuntime_INTERNAL``, ``getPluginRegistry``, ...);
4. compiles (``gcc -shared``) one stub shared library per missing ``NEEDED`` soname in
   which each of those symbols is a trivial function returning 0 (``_ZTV``/``_ZTI``/
   ``_ZTS`` symbols, i.e. C++ vtables/typeinfo, would be zero-filled data);
5. imports ``tensorrt_bindings`` in a subprocess with the stubs on ``LD_LIBRARY_PATH``.
   Registering pybind11 classes does not call into TensorRT, so the import succeeds, and
   the script walks ``dir()`` of the module and of every class/enum (recursively into
   nested classes such as ``ILogger.Severity``).

This is exact for what ``dir()`` shows: the result is the set of names the real module
exposes, including attributes added by the wheel's ``__init__.py`` (``Logger.Severity``,
``DataType.itemsize``, ``volume``, ``nptype``...). Limits:

* Nothing from TensorRT itself is executed, so no behaviour, signatures or deprecation
  status is recorded - only names. A name that exists but raises at runtime (e.g. a
  deprecated API that is a stub) is still listed.
* Class members include inherited ones (``dir()``), e.g. every ``ILayer`` method is listed
  under ``IConvolutionLayer``; ``__*`` names (dunders, the enums' ``__entries``) and
  pybind11 internals (``_pybind11_*``) are dropped. Enum classes list their values plus
  ``name``/``value``.
* Top-level names: all non-``__*``, non-module attributes, plus ``__version__``. This
  includes leftovers of the wheel's ``__init__.py`` (``attr``, ``value``,
  ``common_enter``, ``_itemsize``), since they really are module attributes.
  The ``tensorrt_bindings.plugin`` sub-package (10.x late / 11.x) is not walked.
* Must run with a Python whose version matches the wheel's ``cpXY`` tag, on Linux x86_64,
  with ``gcc``, ``readelf`` and ``nm`` (binutils) available.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "tests" / "data" / "tensorrt_names"

PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64")


# ----------------------------------------------------------------------------- wheel


def fetch_wheel(spec: str, dest: Path) -> Path:
    """Return a wheel path: ``spec`` itself if it is a file, else ``pip download`` it."""
    p = Path(spec)
    if p.is_file():
        return p
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", py, "--implementation", "cp", "-d", str(dest), spec]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected exactly one wheel after pip download, got {wheels}")
    return wheels[0]


def find_extension(root: Path) -> Path:
    """Locate the ``tensorrt*.so`` pybind11 extension inside an unpacked wheel."""
    cands = [p for p in root.rglob("*.so") if p.name.split(".")[0] == "tensorrt"]
    if not cands:
        cands = [p for p in root.rglob("*.so*") if p.parent.name.startswith("tensorrt")]
    if len(cands) != 1:
        raise SystemExit(f"could not find a unique tensorrt extension under {root}: {cands}")
    return cands[0]


# ----------------------------------------------------------------------------- stubs


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def needed_libs(so: Path) -> list[str]:
    out = _run(["readelf", "-d", str(so)])
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def loadable(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def missing_symbols(so: Path, present: list[ctypes.CDLL]) -> list[str]:
    """Undefined, non-weak, unversioned dynamic symbols nothing present can resolve."""
    out = _run(["nm", "-D", "--undefined-only", str(so)])
    syms = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] != "U":  # skip weak ("w", "v") symbols
            continue
        sym = parts[1]
        if "@" in sym:  # versioned: glibc / libstdc++ / libgcc
            continue
        syms.append(sym)
    process = ctypes.CDLL(None)  # the interpreter, libpython, libc, ...
    scopes = [process, *present]
    return sorted(s for s in set(syms) if not any(hasattr(lib, s) for lib in scopes))


def stub_source(symbols: list[str]) -> str:
    lines = ["/* generated by tools/extract_trt_names.py: TensorRT entry-point stubs */"]
    for i, sym in enumerate(symbols):
        if sym.startswith(("_ZTV", "_ZTI", "_ZTS")):
            lines.append(f'char trt_stub_data_{i}[256] __asm__("{sym}") = {{0}};')
        else:
            lines.append(f'void *trt_stub_fn_{i}(void) __asm__("{sym}");')
            lines.append(f"void *trt_stub_fn_{i}(void) {{ return 0; }}")
    return "\n".join(lines) + "\n"


def build_stubs(so: Path, stub_dir: Path) -> dict:
    needed = needed_libs(so)
    present, missing = [], []
    for name in needed:
        lib = loadable(name)
        (present if lib is not None else missing).append(lib if lib is not None else name)
    symbols = missing_symbols(so, present)
    src = stub_dir / "trt_stubs.c"
    src.write_text(stub_source(symbols))
    for soname in missing:
        # every stub library defines every missing symbol; duplicates are harmless for
        # dynamic linking and we do not need to know which real library owns which symbol
        subprocess.run(["gcc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{soname}",
                        "-o", str(stub_dir / soname), str(src)], check=True)
    return {"stubbed_libraries": missing, "stubbed_symbols": symbols}


# ----------------------------------------------------------------------------- dump

# Runs in a subprocess that imports the bindings package; prints JSON on stdout.
DUMP_CODE = r'''
import importlib, json, sys, types, warnings
warnings.simplefilter("ignore")
pkg = sys.argv[1]
trt = importlib.import_module(pkg)
ROOTS = {"tensorrt", pkg.split(".")[0]}

def ours(obj):
    return isinstance(obj, type) and str(getattr(obj, "__module__", "")).split(".")[0] in ROOTS

def public(name):
    # drop dunders, pybind11 internals ("__entries" of enums, "_pybind11_conduit_v1_")
    return not name.startswith(("__", "_pybind11"))

module = {}
def walk(qual, cls, depth):
    if qual in module:
        return
    names = sorted(n for n in dir(cls) if public(n))
    module[qual] = names
    if depth >= 4:
        return
    for n in names:
        try:
            v = getattr(cls, n)
        except Exception:
            continue
        if ours(v) and v is not cls:
            walk(qual + "." + n, v, depth + 1)

top = []
for n in sorted(dir(trt)):
    v = getattr(trt, n)
    if isinstance(v, types.ModuleType) or not public(n):
        continue
    top.append(n)
    if ours(v):
        walk(n, v, 0)
if hasattr(trt, "__version__"):
    top.append("__version__")
json.dump({"tensorrt_version": getattr(trt, "__version__", None),
           "top_level": sorted(top),
           "module": {k: module[k] for k in sorted(module)}}, sys.stdout)
'''


def extract(wheel: Path, work: Path) -> dict:
    tag = re.search(r"-cp(\d)(\d+)-", wheel.name)
    if tag and (int(tag.group(1)), int(tag.group(2))) != sys.version_info[:2]:
        raise SystemExit(f"{wheel.name} is for Python {tag.group(1)}.{tag.group(2)}; "
                         f"run this script with that Python (this is {sys.version.split()[0]})")
    site = work / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    ext = find_extension(site)
    pkg = ".".join(ext.parent.relative_to(site).parts)
    stub_dir = work / "stubs"
    stub_dir.mkdir()
    stub_info = build_stubs(ext, stub_dir)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(stub_dir)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    env["PYTHONPATH"] = str(site)
    env.pop("PYTHONHOME", None)
    proc = subprocess.run([sys.executable, "-s", "-c", DUMP_CODE, pkg],
                          env=env, capture_output=True, text=True, cwd=str(work))
    if proc.returncode != 0:
        raise SystemExit(f"importing {pkg} with stub libraries failed:\n{proc.stderr}")
    data = json.loads(proc.stdout)
    return {
        "tensorrt_version": data["tensorrt_version"],
        "wheel": wheel.name,
        "package": pkg,
        "method": ("import with generated stub libraries ("
                   + ", ".join(stub_info["stubbed_libraries"]) + "); dir() walk")
                  if stub_info["stubbed_libraries"] else "import (real TensorRT libraries); dir() walk",
        "stubbed_symbols": stub_info["stubbed_symbols"],
        "top_level": data["top_level"],
        "module": data["module"],
    }


def dumps(result: dict) -> str:
    """Compact but diff-friendly JSON: one line per class."""
    head = {k: v for k, v in result.items() if k != "module"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
    lines.append('  "module": {')
    items = list(result["module"].items())
    for i, (k, v) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        lines.append(f"    {json.dumps(k)}: {json.dumps(v)}{comma}")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", help="path to a tensorrt-*-bindings wheel, or NAME==VERSION")
    ap.add_argument("-o", "--output", help="output JSON path ('-' for stdout); default "
                    "tests/data/tensorrt_names/tensorrt-<version>.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    for tool in ("gcc", "readelf", "nm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")
    work = Path(tempfile.mkdtemp(prefix="trt_names_"))
    try:
        dl = work / "download"
        dl.mkdir()
        wheel = fetch_wheel(args.wheel, dl)
        result = extract(wheel, work)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = dumps(result)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.output) if args.output else (
        DEFAULT_OUT_DIR / f"tensorrt-{result['tensorrt_version']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    n = sum(len(v) for v in result["module"].values())
    print(f"wrote {out}: {len(result['top_level'])} top-level names, "
          f"{len(result['module'])} classes, {n} members, {len(text)} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
