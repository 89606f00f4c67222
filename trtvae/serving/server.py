"""Run the `tritonserver` that the `triton` extra (nvidia-pytriton) bundles, on a model repository.

`vae-export serve` writes the Python-backend repository of `repository.py` (the one
`vae-export triton --backend python` writes for a Triton container) and runs it here, so the
served code is one and the same. PyTriton's own `Triton.bind` path is not used: its proxy turns
one failing request into an error for every request of the dynamic batch it came in, where
Triton's Python backend answers each request on its own.

Triton 2.51 does not restart a Python-backend worker (stub) that died: the model stays "ready"
and fails every request. `serve` watches the stubs and reloads such a model (explicit model
control), so the requests after a crash are answered again within seconds.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..errors import TrtvaeError, first_line
from .hybrid import Gateway
from .models import TRITON_TYPES

EXTRA_HINT = "pip install 'trtvae[triton]' (nvidia-pytriton bundles tritonserver and its Python backend)"


class ServeError(TrtvaeError, RuntimeError):
    """The server could not be started or stopped as asked."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python version
    libs: Path | None  # the wheel's bundled shared libraries


def find_triton() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServeError(f"serving needs the triton extra: {EXTRA_HINT}")
    root = Path(spec.origin).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    libs = Path(spec.origin).parent.parent / "nvidia_pytriton.libs"
    install = TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python",
                            root / "python_backend_stubs" / version / "triton_python_backend_stub",
                            libs if libs.is_dir() else None)
    for what, path in (("tritonserver", install.binary), ("Python backend", install.python_backend),
                       (f"Python backend stub for Python {version}", install.stub)):
        if not path.exists():
            raise ServeError(f"the installed nvidia-pytriton has no {what} ({path}); reinstall it: {EXTRA_HINT}")
    return install


def check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror}); "
                             f"another server may be using it, choose another port") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server_env(install: TritonInstall) -> dict:
    env = dict(os.environ)
    # The stub links libpython3.x from the system; the running interpreter's own must come first, or a
    # pyenv/conda/uv Python fails in the stub (undefined symbol, or numpy not found).
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in (libdir, str(install.libs) if install.libs else None, env.get("LD_LIBRARY_PATH")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # A venv's packages and this trtvae, whatever the stub takes as its prefix.
    import trtvae

    site = [p for p in sys.path if p.endswith("site-packages")]
    env["PYTHONPATH"] = os.pathsep.join([str(Path(trtvae.__file__).parent.parent), *site,
                                         *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


@dataclass
class TritonServer:
    """One tritonserver process (and its Python stubs, in their own process group) on a repository."""

    repository: Path
    host: str = defaults.SERVE_HOST
    http_port: int = defaults.SERVE_HTTP_PORT
    grpc_port: int = defaults.SERVE_GRPC_PORT
    metrics_port: int = defaults.SERVE_METRICS_PORT
    exit_timeout_s: int = 10
    explicit_models: bool = False  # --model-control-mode=explicit, so a model can be reloaded
    install: TritonInstall = field(default_factory=find_triton)
    process: subprocess.Popen | None = None
    workspace: Path | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self) -> None:
        self.workspace = Path(tempfile.mkdtemp(prefix="trtvae-triton-"))
        backend = self.workspace / "backends" / "python"
        backend.mkdir(parents=True)
        for source in (*self.install.python_backend.iterdir(), self.install.stub):
            if source.is_file():
                os.symlink(source, backend / source.name)
        self._shm_prefix = f"trtvae{os.getpid()}_{self.workspace.name[-8:]}_"
        cmd = [str(self.install.binary), f"--model-repository={self.repository}",
               f"--backend-directory={self.workspace / 'backends'}",
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", f"--exit-timeout-secs={self.exit_timeout_s}"]
        if self.explicit_models:
            cmd += ["--model-control-mode=explicit", "--load-model=*"]
        self.log_path = self.workspace / "tritonserver.log"
        log = open(self.log_path, "wb")
        # Its own session: the stubs share its process group, so stop() can make sure none is left.
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_server_env(self.install),
                                        start_new_session=True)
        log.close()

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def wait_ready(self, models: list, timeout_s: float = 180.0) -> float:
        """Seconds until the server and every model are ready; raises (with the server's log) otherwise."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if self.process.poll() is not None:
                raise ServeError(f"tritonserver exited with code {self.process.returncode} while starting:\n"
                                 f"{self.log_tail()}")
            if self._get("/v2/health/ready") == 200 and all(self._get(f"/v2/models/{m}/ready") == 200 for m in models):
                return time.perf_counter() - start
            time.sleep(0.25)
        raise ServeError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def workers(self, model: str) -> int:
        """Live Python-backend stubs of `model` (their command line names its folder in the repository)."""
        return sum(1 for _, status in processes_with(f"{self.repository}/{model}/") if status.get("State", "")[:1] != "Z")

    def reload(self, model: str) -> bool:
        request = urllib.request.Request(f"{self.http_url}/v2/repository/models/{model}/load", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGINT (Triton unloads its models and exits), then SIGKILL for anything of its group still there."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=self.exit_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # a stub that outlived the server
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        shm = Path("/dev/shm")
        if self.workspace is not None:
            if shm.is_dir():
                for leftover in shm.glob(f"{self._shm_prefix}*"):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None


def processes_with(marker: str) -> list:
    """[(pid, /proc status fields)] of the processes whose command line contains `marker`.

    The server and each Python stub name the model repository on their command line, so this finds
    a server's whole family without psutil.
    """
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker not in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                continue
            status = dict(ln.split(":", 1) for ln in (proc / "status").read_text().splitlines() if ":" in ln)
        except OSError:
            continue
        found.append((int(proc.name), {k: v.strip() for k, v in status.items()}))
    return found


def describe(decl) -> str:
    """One served model's I/O in one line, from its declaration."""
    def tensor(t):
        return f"{t.name} {TRITON_TYPES[t.dtype].removeprefix('TYPE_')} [B, {', '.join(map(str, t.dims))}]"

    return f"{tensor(decl.input)} -> {tensor(decl.output)}"


def serve(directory, host: str = defaults.SERVE_HOST, http_port: int = defaults.SERVE_HTTP_PORT,
          grpc_port: int = defaults.SERVE_GRPC_PORT, metrics_port: int = defaults.SERVE_METRICS_PORT,
          backend: str = "auto", max_batch: int = defaults.TRITON_MAX_BATCH, instances: int = defaults.TRITON_INSTANCES,
          prefix: str = defaults.TRITON_PREFIX,
          dynamic_batching: bool = True, stop_event: threading.Event | None = None, out=print,
          hybrid_port: int | None = None, hybrid_max_body: int = defaults.HYBRID_MAX_BODY) -> int:
    """Serve the export in `directory` until SIGINT/SIGTERM (or `stop_event`); return the exit code."""
    from ..manifest import read_manifest
    from ..swap import assumed_family_note, load_runtime
    from .models import model_decls
    from .repository import write_triton_repo

    manifest = read_manifest(directory)  # a folder without a finished export fails here, before anything starts
    install = find_triton()
    for flag, port in (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port),
                       *((("--hybrid-port", hybrid_port),) if hybrid_port is not None else ())):
        check_port_free(host, port, flag)
    # diffusers' remote VAE protocol (hybrid.py): its options checked now, listening once Triton is ready.
    gateway = None if hybrid_port is None else Gateway(manifest, prefix, host, hybrid_port, grpc_port, hybrid_max_body)
    try:
        runtime, reason = load_runtime(directory, backend)  # cheap: sessions and engines load on first use
    except (ImportError, RuntimeError, OSError, ValueError) as e:  # --backend tensorrt where it cannot run
        raise ServeError(f"--backend {backend}: {first_line(e)}") from None
    out(f"runtime: {type(runtime).__name__} ({reason})")
    if note := assumed_family_note(runtime.manifest):
        out(f"! {note} (vae_decode_image unscales with it)")
    resolved = runtime.backend
    del runtime
    stop_event = stop_event or threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop_event.set()) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    repo_root = Path(tempfile.mkdtemp(prefix="trtvae-serve-"))
    server = None
    try:
        repository = repo_root / "models"
        write_triton_repo(directory, repository, "python", prefix, max_batch, instances, resolved,
                          dynamic_batching, export_in_place=True)
        decls = model_decls(manifest, prefix)
        models = [d.name for d in decls]
        server = TritonServer(repository, host, http_port, grpc_port, metrics_port, install=install,
                              explicit_models=True)
        start = time.perf_counter()
        server.start()
        out(f"starting tritonserver (pid {server.process.pid}) on {repository}")
        server.wait_ready(models)
        out(f"Triton ready in {time.perf_counter() - start:.1f} s: HTTP {server.http_url}, "
            f"gRPC {host}:{grpc_port}, metrics http://{host}:{metrics_port}/metrics")
        for decl in decls:
            out(f"  model {decl.name}: {describe(decl)}")
        if gateway is not None:
            gateway.start()
            out(f"diffusers remote VAE (remote_decode/remote_encode): {gateway.describe()}")
        out("Ctrl-C (SIGINT) or SIGTERM stops the server")
        watch = _Watchdog(server, models, instances, out)
        while not stop_event.wait(0.5):
            if not server.alive():
                raise ServeError(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}")
            watch.check()
        out("stopping tritonserver")
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(repo_root, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Watchdog:
    """Reload a model whose worker died (Triton leaves it "ready" and failing), at most once per interval."""

    def __init__(self, server: TritonServer, models: list, instances: int, out, every_s: float = 2.0,
                 min_interval_s: float = 30.0):
        self.server, self.models, self.instances, self.out = server, models, instances, out
        self.every_s, self.min_interval_s = every_s, min_interval_s
        self._next = time.monotonic() + every_s
        self._reloaded: dict = {}

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        for model in self.models:
            if self.server.workers(model) >= self.instances:
                continue
            if now - self._reloaded.get(model, -self.min_interval_s) < self.min_interval_s:
                continue
            self._reloaded[model] = now
            self.out(f"model {model}: a worker process died; reloading the model")
            ok = self.server.reload(model)
            self.out(f"model {model}: {'reloaded' if ok else 'reload failed; its requests fail until a restart'}")
