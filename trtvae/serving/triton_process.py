"""One `tritonserver` process, the one the `triton` extra (nvidia-pytriton) bundles, on a model repository.

Invariants:
- tritonserver runs in its own session; its Python stubs share its process group, and `stop()` kills
  that group, so nothing of it outlives `stop()`, even after a failed or partial start.
- tritonserver gets SIGTERM (its clean shutdown, stubs included) when the thread that started it dies
  (PR_SET_PDEATHSIG), and a stub exits once its parent is gone: a killed supervisor leaves nothing.
- Models are loaded through Triton's model-control API (explicit mode) by `load()`, which returns the
  model's own load error; `wait_ready` and `load` never block a stop request for long.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..errors import TrtvaeError, first_line

EXTRA_HINT = "pip install 'trtvae[triton]' (nvidia-pytriton bundles tritonserver and its Python backend)"
READY_TIMEOUT_S = 300  # a model's load includes its warm-up inference, on a CPU too


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


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server_env(install: TritonInstall) -> dict:
    env = dict(os.environ)
    # The stub links libpython3.x from the system; the running interpreter's own must come first, or a
    # pyenv/conda/uv Python fails in the stub (undefined symbol, or numpy not found).
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in (libdir, str(install.libs) if install.libs else None, env.get("LD_LIBRARY_PATH")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _die_with_parent():
    """preexec_fn: SIGTERM (Triton's clean shutdown, stubs included) when the starting thread dies."""
    libc, parent = ctypes.CDLL(None, use_errno=True), os.getpid()

    def preexec():
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


@dataclass
class TritonServer:
    """One tritonserver process (and its Python stubs, in its process group) on a repository."""

    repository: Path
    host: str = defaults.SERVE_HOST
    http_port: int = defaults.SERVE_HTTP_PORT
    grpc_port: int = defaults.SERVE_GRPC_PORT
    metrics_port: int = defaults.SERVE_METRICS_PORT
    exit_timeout_s: int = 10
    explicit_models: bool = False  # --model-control-mode=explicit: models are loaded (and reloaded) by load()
    install: TritonInstall = field(default_factory=find_triton)
    process: subprocess.Popen | None = None
    workspace: Path | None = None
    log_path: Path | None = None
    shm_prefix: str = ""

    def __post_init__(self):
        self.repository = Path(self.repository).resolve()  # the server runs in another folder

    @property
    def url(self) -> str:
        """host:port of the HTTP endpoint, as tritonclient takes it."""
        return hostport(self.host, self.http_port)

    @property
    def http_url(self) -> str:
        return f"http://{self.url}"

    def client(self, timeout_s: float = 10.0):
        import tritonclient.http as http  # one client per thread: it is not thread-safe

        return http.InferenceServerClient(self.url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def start(self) -> None:
        self.workspace = Path(tempfile.mkdtemp(prefix="trtvae-triton-"))
        backend = self.workspace / "backends" / "python"
        backend.mkdir(parents=True)
        for source in (*self.install.python_backend.iterdir(), self.install.stub):
            if source.is_file():
                os.symlink(source, backend / source.name)
        self.shm_prefix = f"trtvae{os.getpid()}_{self.workspace.name[-8:]}_"
        cmd = [str(self.install.binary), f"--model-repository={self.repository}",
               f"--backend-directory={self.workspace / 'backends'}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", f"--exit-timeout-secs={self.exit_timeout_s}"]
        if self.explicit_models:
            cmd += ["--model-control-mode=explicit"]
        self.log_path = self.workspace / "tritonserver.log"
        import trtvae

        with open(self.log_path, "wb") as log:
            # Its own session: the stubs share its process group, so stop() can make sure none is left.
            # The stubs run Python isolated (PYTHONPATH ignored) with their working folder first on sys.path:
            # started in the folder holding this trtvae, they import this one, not another installed copy.
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_server_env(self.install),
                                            cwd=Path(trtvae.__file__).parent.parent, start_new_session=True,
                                            preexec_fn=_die_with_parent())

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError, TypeError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def exit_error(self) -> ServeError:
        errors = [ln for ln in self.log_tail(40).splitlines() if "error" in ln.lower()] or [self.log_tail(1)]
        return ServeError(f"tritonserver exited with code {self.process.returncode}: {errors[-1].strip()}")

    def _ready(self, models: list) -> bool:
        try:
            client = self.client(2.0)
            try:
                return client.is_server_ready() and all(client.is_model_ready(m) for m in models)
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - not listening yet, or refused: not ready
            return False

    def wait_ready(self, models: list, timeout_s: float = READY_TIMEOUT_S,
                   stop_event: threading.Event | None = None) -> bool:
        """Wait until the server and `models` are ready (True) or `stop_event` is set (False); raises otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.exit_error()
            if self._ready(models):
                return True
            if (stop_event or threading.Event()).wait(0.25):
                return False
        raise ServeError(f"tritonserver was not ready after {timeout_s:.0f} s: {self.log_tail(1)}")

    def load(self, model: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """(Re)load `model` and return once it is ready; raises ServeError with Triton's reason."""
        from tritonclient.utils import InferenceServerException

        client = self.client(timeout_s)
        try:
            client.load_model(model)
        except InferenceServerException as e:
            text = e.message() or str(e)
            # Triton wraps the model's own error ("model X cannot load: ...") in its load report.
            mine = text[text.find(f"model {model} cannot load"):] if f"model {model} cannot load" in text else text
            raise ServeError(first_line(mine).rstrip(";")) from None
        except Exception as e:  # noqa: BLE001 - the server went away while loading
            raise (self.exit_error() if not self.alive() else ServeError(f"loading {model}: {first_line(e)}")) from None
        finally:
            client.close()

    def config(self, model: str) -> dict:
        """The model's configuration as the server loaded it."""
        client = self.client()
        try:
            return client.get_model_config(model)
        finally:
            client.close()

    def workers(self, model: str) -> int:
        """Live Python-backend stubs of `model` (their command line names its folder in the repository)."""
        return len(processes_with(f"{self.repository}/{model}/"))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float | None = None) -> None:
        """SIGINT (Triton unloads its models and exits), then SIGKILL for anything of its group still there.

        Safe after a failed or partial start. `grace_s`: how long to wait before SIGKILL (default: Triton's
        own exit timeout for in-flight requests, and 2 s; a model still loading would hold it longer).
        """
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=self.exit_timeout_s + 2 if grace_s is None else grace_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # a stub that outlived the server
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        if self.shm_prefix and Path("/dev/shm").is_dir():
            for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None


def processes_with(marker: str) -> list:
    """Live processes (psutil) whose command line contains `marker`: a server and its stubs name their repository."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline", "status"]) if p.pid != os.getpid()
            and p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or ())]
