"""`vae-export serve` starting, failing and stopping, against the real bundled tritonserver on loopback.

A changed file keeps its model from ever being ready and ends `serve` with one line naming it; SIGINT
while models load stops everything within seconds; SIGKILL of `serve` leaves no tritonserver or stub;
every option is refused before anything starts; the port probe is exact.
"""
from __future__ import annotations

import errno
import re
import shutil
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("pytriton", reason="needs the triton extra: pip install -e '.[triton]'")
import tritonclient.http as http  # noqa: E402
from triton_helpers import free_port, processes_mentioning, read_until, start_serve, wait_gone  # noqa: E402

from trtvae.cli import main  # noqa: E402
from trtvae.errors import OptionError  # noqa: E402
from trtvae.serving.server import ServeError, TritonServer, check_ports  # noqa: E402

STARTING = r"starting tritonserver \(pid \d+\) on (\S+/models)$"


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_file_changed_after_export_never_gets_ready_and_serve_names_it(tmp_path, tiny_fp16):
    export = tmp_path / "export"
    shutil.copytree(tiny_fp16, export)
    _flip_a_byte(export / "decoder.onnx")
    proc, ports = start_serve(export)
    ready_seen, stop = [], threading.Event()

    def watch():  # the model's readiness, as a client sees it, for as long as serve runs
        while not stop.is_set():
            try:
                client = http.InferenceServerClient(f"127.0.0.1:{ports[0]}", connection_timeout=2, network_timeout=2)
                ready_seen.append(client.is_model_ready("vae_decoder"))
                client.close()
            except Exception:  # noqa: BLE001 - not listening (yet, or any more)
                pass
            stop.wait(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        stop.set()
        watcher.join()
        proc.kill()
    repo = next(ln.split(" on ")[-1] for ln in output.splitlines() if ln.startswith("starting tritonserver"))
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1, output
    assert len(errors) == 1 and "Traceback" not in output, output
    # Both models that run decoder.onnx fail; the first to fail ends the start.
    assert re.match(r"error: model vae_decode(r|_image) cannot load: ManifestError: ", errors[0]), errors[0]
    assert f"{export / 'decoder.onnx'}: sha256" in errors[0] and "changed or replaced after export" in errors[0]
    assert ready_seen.count(False) > 0 and True not in ready_seen  # asked while it loaded: never ready
    assert wait_gone(repo, 30) == []


def test_sigint_while_models_load_stops_everything_within_seconds(tiny_fp16):
    proc, _ = start_serve(tiny_fp16)
    lines = []
    try:
        m = read_until(proc, STARTING, lines)
        assert m, "".join(lines)
        repo = m.group(1)
        deadline = time.monotonic() + 60  # models are loading once their stubs exist; stop then
        while not processes_mentioning(f"{repo}/vae_decoder/") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(f"{repo}/vae_decoder/"), "no model started loading"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
        left = wait_gone(repo, 10)
    finally:
        proc.kill()
    output = "".join(lines) + proc.stdout.read()
    assert "Triton ready" not in output, output  # it really was stopped while starting
    assert code == 130 and "interrupted while starting" in output, output
    assert took < 15, f"serve took {took:.1f} s to stop"
    assert left == []
    print(f"SIGINT while loading: serve exited in {took:.1f} s")


def test_sigkill_of_serve_leaves_no_tritonserver_or_stub(tiny_fp16):
    proc, _ = start_serve(tiny_fp16, "--prefix", "killed")
    lines = []
    try:
        m = read_until(proc, STARTING, lines)
        assert m, "".join(lines)
        repo = m.group(1)
        assert read_until(proc, r"^Ctrl-C", lines), "".join(lines)
        family = processes_mentioning(repo)
        assert len(family) >= 4  # tritonserver and a stub per model
        proc.kill()
        proc.wait(timeout=10)
        sent = time.monotonic()
        left = wait_gone(repo, 60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert left == [], f"still running after SIGKILL of serve: {left}"
    print(f"SIGKILL of serve: its {len(family)} processes were gone {took:.1f} s later")


# --- refused before anything starts: one error line, no traceback, no process ------------------------------
@pytest.mark.parametrize("args,message", [
    (["--http-port", "0"], "error: --http-port 0: expected a TCP port, 1 to 65535"),
    (["--grpc-port", "70000"], "error: --grpc-port 70000: expected a TCP port"),
    (["--http-port", "{p}", "--grpc-port", "{p}"], "expected a different port for each"),
    (["--max-batch", "0"], "error: --max-batch 0: expected a whole number, at least 1"),
    (["--instances", "-2"], "error: --instances -2"),
    (["--prefix", "a/b"], "error: --prefix 'a/b'"),
    (["--prefix", ""], "error: --prefix ''"),
    (["--host", "no-such-host.invalid"], "error: --host 'no-such-host.invalid'"),
    (["--host", "192.0.2.1"], "error: --host 192.0.2.1: cannot listen on it"),
], ids=["port-0", "port-high", "same-ports", "max-batch", "instances", "prefix-slash", "prefix-empty", "host",
        "host-not-here"])
def test_bad_serve_options_are_one_error_line(tiny_fp16, capsys, args, message):
    p = free_port()
    ports = {"--http-port": p, "--grpc-port": free_port(), "--metrics-port": free_port()}
    ports.update({a: int(b.format(p=p)) for a, b in zip(args[::2], args[1::2]) if a in ports})
    rest = [x.format(p=p) for a, b in zip(args[::2], args[1::2]) if a not in ports for x in (a, b)]
    argv = ["serve", str(tiny_fp16), *[x for kv in ports.items() for x in map(str, kv)], *rest]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_missing_folder_is_one_error_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nowhere: not a folder" in err[0]


@pytest.mark.parametrize("args,message", [(["--max-batch", "0"], "--max-batch 0"), (["--instances", "0"], "--instances 0"),
                                          (["--prefix", "../up"], "--prefix '../up'"), (["--repo", "{file}"], "is a file")],
                         ids=["max-batch", "instances", "prefix", "repo-file"])
def test_bad_triton_options_are_one_error_line_and_write_nothing(tmp_path, tiny_fp16, capsys, args, message):
    (tmp_path / "file").write_text("")
    repo = tmp_path / "repo"
    argv = ["triton", str(tiny_fp16), "--backend", "python", "--repo", str(repo), *args]
    argv = [a.format(file=tmp_path / "file") for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not repo.exists()


# --- the port probe ---------------------------------------------------------------------------------------
def _time_wait_port(host="127.0.0.1", family=socket.AF_INET) -> int:
    """A port whose only socket is in TIME_WAIT: a server (SO_REUSEADDR, as Triton's) closed a connection first."""
    with socket.socket(family) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection((host, port))
        conn, _ = server.accept()
        conn.close()  # the side that closes first holds TIME_WAIT, on the server's port
        time.sleep(0.1)
        client.close()
    return port


def test_port_probe_is_exact():
    port = _time_wait_port()
    with socket.socket() as plain:  # what the old probe did: no SO_REUSEADDR, refused in TIME_WAIT
        with pytest.raises(OSError) as e:
            plain.bind(("127.0.0.1", port))
        assert e.value.errno == errno.EADDRINUSE
    check_ports("127.0.0.1", {"--http-port": port})  # free for a server (Triton binds with SO_REUSEADDR)
    with socket.socket() as listening:
        listening.bind(("0.0.0.0", 0))
        listening.listen()
        busy = listening.getsockname()[1]
        with pytest.raises(ServeError, match=f"--http-port {busy}: cannot listen on 127.0.0.1:{busy}"):
            check_ports("127.0.0.1", {"--http-port": busy})


def test_port_probe_uses_ipv6_for_an_ipv6_host():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        listening = socket.socket(socket.AF_INET6)
        listening.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here ({e.strerror})")
    with listening:
        listening.listen()
        busy = listening.getsockname()[1]
        with pytest.raises(ServeError, match=f"--grpc-port {busy}: cannot listen on ::1:{busy}"):
            check_ports("::1", {"--grpc-port": busy})
    with pytest.raises(OptionError, match="--host"):
        check_ports("::1::", {"--grpc-port": busy})


def test_stop_after_a_failed_start_does_not_hide_the_error(tmp_path):
    from dataclasses import replace

    from trtvae.serving.server import find_triton

    server = TritonServer(tmp_path, install=replace(find_triton(), binary=tmp_path / "no-tritonserver"))
    server.stop()  # never started
    with pytest.raises(FileNotFoundError, match="no-tritonserver"):
        try:
            server.start()
        finally:
            server.stop()
    assert server.workspace is None
