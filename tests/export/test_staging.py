"""Staged re-exports: a failed, refused or interrupted export leaves --out byte for byte as it was.

The planted overflow here scales one named convolution's weights directly (not through the package's
rescaling plan): `decoder.conv_in` × 2^16 puts the tiny decoder's residual stream near 1e5, past fp16.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_vae
from trtvae import OrtVae
from trtvae.cli import main
from trtvae.errors import ModelLoadError, VerificationError
from trtvae.export.options import ExportOptions
from trtvae.export.run import run_export
from trtvae.manifest import MANIFEST_NAME

USER_FILE = "notes.txt"  # not an export's: a re-export must carry it over


def _hashes(folder: Path) -> dict:
    """Every file under `folder` (recursively) → its SHA-256; folders → None."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _leftovers(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_dir):
    """A finished export with a timing cache and a user's file in it."""
    out = tmp_path_factory.mktemp("good") / "export"
    run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=out, verify=False, components=("decoder",)))
    (out / "timing.cache").write_bytes(b"tactics timed before")
    (out / "timing.cache.json").write_text('{"file": "timing.cache"}\n')
    (out / USER_FILE).write_text("mine")
    return out


@pytest.fixture
def export_dir(good, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(good, out)
    return out


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    vae = make_tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(2.0 ** 16)
        vae.decoder.conv_in.bias.mul_(2.0 ** 16)
    path = tmp_path_factory.mktemp("planted_conv_in")
    vae.save_pretrained(path)
    return path


def _assert_untouched(out: Path, before: dict) -> None:
    assert _hashes(out) == before
    assert _leftovers(out) == []  # no staging folder, no old folder
    assert OrtVae.from_pretrained(out).manifest["components"]["decoder"]["onnx"] == "decoder.onnx"


def test_failing_verify_leaves_the_export_and_keeps_the_new_files_for_inspection(export_dir, planted_dir):
    before = _hashes(export_dir)
    with pytest.raises(VerificationError, match="fp16 overflow") as e:
        run_export(ExportOptions(model=str(planted_dir), precision="fp16", out=export_dir, rescale=False,
                                 engines="skip", components=("decoder",)))
    _assert_untouched(export_dir, before)
    inspect = export_dir.parent / "export.inspect"
    assert str(inspect) in str(e.value) and "was left as it was" in str(e.value)
    assert (inspect / "decoder.onnx").is_file() and (inspect / "fp16_audit.json").is_file()
    assert not (inspect / MANIFEST_NAME).exists()
    with pytest.raises(Exception, match="manifest"):
        OrtVae.from_pretrained(inspect)


def test_failing_load_leaves_the_export(export_dir, tmp_path):
    before = _hashes(export_dir)
    with pytest.raises(ModelLoadError):
        run_export(ExportOptions(model=str(tmp_path / "no-such-model"), precision="fp16", out=export_dir,
                                 engines="skip"))
    _assert_untouched(export_dir, before)


def test_successful_reexport_swaps_in_whole_and_carries_the_cache_and_user_files(export_dir, tiny_dir):
    cache = (export_dir / "timing.cache").read_bytes()
    assert OrtVae.from_pretrained(export_dir).manifest["verify"]["status"] == "skipped"
    run_export(ExportOptions(model=str(tiny_dir), precision="fp32", out=export_dir, components=("decoder",)))
    assert (export_dir / "timing.cache").read_bytes() == cache
    assert (export_dir / USER_FILE).read_text() == "mine"
    assert OrtVae.from_pretrained(export_dir).manifest["verify"]["status"] == "passed"  # the new export
    assert _leftovers(export_dir) == []


def test_no_rescale_no_verify_on_an_overflowing_model_exits_nonzero_without_manifest(planted_dir, tmp_path, capsys):
    out = tmp_path / "new"
    code = main(["--model", str(planted_dir), "--out", str(out), "--precision", "fp16", "--no-rescale",
                 "--no-verify", "--engines", "skip", "--components", "decoder"])
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fp16 overflow" in errors[0] and "decoder." in errors[0], err
    assert not out.exists()  # nothing was ever put in place
    kept = tmp_path / "new.inspect"
    assert (kept / "decoder.onnx").is_file() and not (kept / MANIFEST_NAME).exists()


def test_a_non_export_folder_is_refused_before_loading(tmp_path, tiny_dir):
    from trtvae.errors import OptionError

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "photo.png").write_bytes(b"not ours")
    with pytest.raises(OptionError, match="not a trtvae export folder"):
        run_export(ExportOptions(model=str(tmp_path / "missing"), precision="fp32", out=theirs))
    assert _hashes(theirs) == {"photo.png": hashlib.sha256(b"not ours").hexdigest()}


# -- signals, sent to a real `vae-export` after a stage line appears ------------------------------------------

@pytest.mark.parametrize("after_line,sig", [
    ("fp16 audit", signal.SIGINT),  # during the decoder's ONNX export
    ("export decoder ONNX", signal.SIGINT),  # during the encoder's
    ("export encoder ONNX", signal.SIGTERM),  # during verify
])
def test_a_signal_at_any_stage_leaves_the_export(export_dir, tiny_dir, after_line, sig):
    before = _hashes(export_dir)
    cmd = [sys.executable, "-m", "trtvae.cli", "--model", str(tiny_dir), "--out", str(export_dir),
           "--precision", "fp16", "--engines", "skip"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell's background job starts with SIGINT ignored, and Python then keeps it ignored (as it should): give
    # the export the default disposition a terminal's Ctrl-C meets, whatever ran this test.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("✓") and after_line in line:
                time.sleep(0.3)  # into the next stage
                proc.send_signal(sig)
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(after_line in line for line in seen), "".join(seen)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted" in err and "Traceback" not in err
    _assert_untouched(export_dir, before)


def test_an_interrupt_inside_a_string_exec_still_exits_130(tmp_path):
    """The CI flake behind this test: a Ctrl-C landing while torch.export builds dataclasses (string exec)."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys\n"
        "import trtvae.cli as cli\n"
        "cli._export = lambda argv: exec('raise KeyboardInterrupt', {})\n"
        "sys.exit(cli.main(['--model', 'x']))\n")
    checkout = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr


def test_an_interrupt_python_could_not_raise_still_stops_the_export(export_dir, tiny_dir, monkeypatch, capsys):
    """A SIGINT landing in a weakref callback: Python prints it as "Exception ignored" and goes on."""
    import weakref

    import trtvae.export.run as pipeline

    real = pipeline.export_onnx

    def export_onnx(*args, **kwargs):
        class Thing:
            pass

        def interrupted(ref):
            raise KeyboardInterrupt

        thing = Thing()
        ref = weakref.ref(thing, interrupted)
        del thing
        assert ref() is None
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "export_onnx", export_onnx)
    before = _hashes(export_dir)
    code = main(["--model", str(tiny_dir), "--out", str(export_dir), "--precision", "fp32", "--components", "decoder",
                 "--no-verify"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err, err
    assert "Exception ignored" not in err
    _assert_untouched(export_dir, before)


# -- out of GPU memory: one line naming the stage and what to change --------------------------------------------

@pytest.mark.parametrize("target,raised,where,change", [
    ("_build_engines", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"),
     "the TensorRT build", "--workspace"),
    ("_build_engines", RuntimeError("TensorRT failed to build the decoder engine: Requested amount of GPU memory "
                                    "(8589934592 bytes) could not be allocated. out of memory"),
     "the TensorRT build", "--workspace"),
    ("verify_export", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.00 GiB"), "verify",
     "--no-verify"),
])
def test_out_of_memory_in_a_gpu_stage_is_one_error_line(export_dir, tiny_dir, monkeypatch, capsys, target, raised,
                                                        where, change):
    import trtvae.export.run as pipeline

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(pipeline, target, fail)
    before = _hashes(export_dir)
    code = main(["--model", str(tiny_dir), "--out", str(export_dir), "--precision", "fp32", "--components", "decoder"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(f"error: out of GPU memory in {where}") and change in line and "--batch" in line, line
    _assert_untouched(export_dir, before)


def test_out_of_memory_elsewhere_is_still_one_error_line(export_dir, tiny_dir, monkeypatch, capsys):
    import trtvae.export.run as pipeline

    def export_onnx(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(pipeline, "export_onnx", export_onnx)
    before = _hashes(export_dir)
    code = main(["--model", str(tiny_dir), "--out", str(export_dir), "--precision", "fp32", "--components", "decoder"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: out of GPU memory (CUDA out of memory") and "--batch" in line, line
    _assert_untouched(export_dir, before)


# -- the swap itself (no model needed) ----------------------------------------------------------------------------

def _fake_export(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST_NAME).write_text(text)
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_signal_during_the_swap_waits_until_it_is_done(tmp_path, monkeypatch, capsys):
    from trtvae.export import outdir

    out = _fake_export(tmp_path / "out", "old")
    (out / USER_FILE).write_text("mine")
    real_rename = os.rename
    calls = []

    def rename_then_signal(src, dst):
        real_rename(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # between the two renames: --out does not exist at this instant
            os.kill(os.getpid(), signal.SIGINT)

    with outdir.Staging(out) as staging:
        (staging.path / MANIFEST_NAME).write_text("new")
        monkeypatch.setattr(outdir.os, "rename", rename_then_signal)
        staging.commit()  # no KeyboardInterrupt: the swap finished first
    monkeypatch.undo()
    assert (out / MANIFEST_NAME).read_text() == "new" and (out / USER_FILE).read_text() == "mine"
    assert _leftovers(out) == []
    assert "SIGINT during the final swap" in capsys.readouterr().out


def test_leftovers_of_a_killed_export_are_cleared_and_a_half_swap_undone(tmp_path):
    from trtvae.export import outdir

    pid = _dead_pid()
    out = tmp_path / "out"
    old = _fake_export(tmp_path / f".out.old-{pid}", "the good export")  # killed between the two renames
    staged = _fake_export(tmp_path / f".out.staging-{pid}", "half")
    theirs = tmp_path / f".out.staging-{os.getpid()}x"  # not a pid: not ours to remove
    theirs.mkdir()
    with outdir.Staging(out) as staging:
        assert (out / MANIFEST_NAME).read_text() == "the good export"  # restored before anything else
        assert not old.exists() and not staged.exists() and theirs.exists()
        assert staging.path.name == f".out.staging-{os.getpid()}"
    assert (out / MANIFEST_NAME).read_text() == "the good export"
    assert _leftovers(out) == [theirs.name]
