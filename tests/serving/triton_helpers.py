"""Shared by the serving tests: free ports, processes of a server, configs, and requests through tritonclient."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list:
    """PIDs of live processes whose command line contains `text` (the server and its stubs name their repository)."""
    from trtvae.serving.server import processes_with

    return [p.pid for p in processes_with(text)]


def wait_gone(text: str, timeout_s: float) -> list:
    """Wait until no live process mentions `text`; returns those still there after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def read_config(path):
    """A config.pbtxt parsed into Triton's own `ModelConfig` message."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def write_config(path, config) -> None:
    from google.protobuf import text_format

    Path(path).write_text(text_format.MessageToString(config))


def start_serve(export, *args, ports=None):
    """`vae-export serve EXPORT ARGS` on free loopback ports; returns (process, ports)."""
    ports = ports or [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "trtvae.cli", "serve", str(export), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), ports


def read_until(proc, pattern: str, lines: list, timeout_s: float = 240) -> re.Match | None:
    """Read the process's output into `lines` until a line matches `pattern` (None at EOF or timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        lines.append(line)
        if m := re.search(pattern, line):
            return m
    return None


def serve_ready(export, *args, ports=None, timeout_s: float = 240) -> dict:
    """`vae-export serve` started and read up to its "Ctrl-C" line (the test fails with the output otherwise).

    Returns {"proc", "ports", "repo", "banner", "later"}; a thread keeps reading what serve prints into
    "later", so its pipe never fills and tests can see its notices.
    """
    import threading

    import pytest

    proc, ports = start_serve(export, *args, ports=ports)
    lines: list = []
    ready = read_until(proc, r"^Ctrl-C", lines, timeout_s)
    if ready is None:
        proc.kill()
        pytest.fail("vae-export serve did not get ready:\n" + "".join(lines) + proc.stdout.read())
    repo = next((m.group(1) for ln in lines if (m := re.search(r"on (\S+/models)$", ln.strip()))), None)
    info = {"proc": proc, "ports": ports, "repo": repo, "banner": "".join(lines), "later": []}
    threading.Thread(target=lambda: info["later"].extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return info


def infer(client_module, url: str, model: str, name: str, array: np.ndarray, output: str, timeout: float = 60.0):
    """One request over HTTP or gRPC with binary tensors; returns the output array."""
    types = {np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32"}
    inp = client_module.InferInput(name, list(array.shape), types[array.dtype])
    if client_module.__name__.endswith("http"):
        client = client_module.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)
        inp.set_data_from_numpy(array, binary_data=True)
        result = client.infer(model, [inp], outputs=[client_module.InferRequestedOutput(output, binary_data=True)])
    else:
        client = client_module.InferenceServerClient(url)
        inp.set_data_from_numpy(array)
        result = client.infer(model, [inp], client_timeout=timeout)
    try:
        return result.as_numpy(output)
    finally:
        client.close()


def run_threads(work, count: int, timeout_s: float = 300) -> list:
    """Run work(0) … work(count - 1) at once, each on its own thread; return what they raised, as reprs."""
    errors = []

    def guarded(t):
        try:
            work(t)
        except Exception as e:  # noqa: BLE001 - the caller asserts on the list
            errors.append(repr(e))

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=timeout_s)
    return errors
