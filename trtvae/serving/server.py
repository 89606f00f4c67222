"""Run the `tritonserver` that the `triton` extra (nvidia-pytriton) bundles, on a model repository.

`vae-export serve` writes the Python-backend repository of `repository.py` (the one
`vae-export triton --backend python` writes for a Triton container) and runs it here, so the
served code is one and the same. PyTriton's own `Triton.bind` path is not used: its proxy turns
one failing request into an error for every request of the dynamic batch it came in, where
Triton's Python backend answers each request on its own.

Invariants:
- Every option is checked, and the ports probed, before tritonserver starts.
- Models are loaded through Triton's model-control API (explicit mode), each with a warm-up
  inference in its `initialize`, so "ready" means loaded; a model that cannot load ends `serve`
  with Triton's reason (which names the file).
- SIGINT/SIGTERM stop the server at any point, loads and reloads included (they run in threads).
- tritonserver gets SIGTERM when the thread that started it dies (PR_SET_PDEATHSIG), and its Python
  stubs exit when it does; `stop()` also kills its whole process group.
- Triton 2.51 does not restart a Python-backend worker (stub) that died: the model stays "ready"
  and fails every request. `serve` watches the stubs and reloads such a model.
"""
from __future__ import annotations

import errno
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from .. import defaults
from ..errors import OptionError, first_line
from ..precision import DTYPES
from .triton_process import ServeError, TritonServer, find_triton, hostport, processes_with  # noqa: F401

LOADER_JOIN_S = 30  # a load's HTTP call fails within a second once the server is gone
STARTING_GRACE_S = 2  # SIGINT before SIGKILL for a server still loading: no request to drain


def check_ports(host: str, ports: dict) -> None:
    """`ports` {flag: port}: each a distinct TCP port this host can listen on, as Triton binds them.

    SO_REUSEADDR as Triton's servers set it, so a port in TIME_WAIT after a restart is free and a
    listening one is not; the address family is the host's (IPv6 for "::1").
    """
    for flag, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise OptionError(f"{flag} {port!r}: expected a TCP port, 1 to 65535")
    if len(set(ports.values())) < len(ports):
        raise OptionError(f"{', '.join(f'{f} {p}' for f, p in ports.items())}: expected a different port for each")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise OptionError(f"--host {host!r}: not an address this machine can listen on ({e})") from None
    for flag, port in ports.items():
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address[0], port, *address[2:]))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise OptionError(f"--host {host}: cannot listen on it ({e.strerror})") from None
                raise ServeError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror}); "
                                 f"another server may be using it, choose another port") from None


def describe(decl) -> str:
    """One served model's I/O in one line, from its declaration."""
    def tensor(t):
        return f"{t.name} {DTYPES[t.dtype]['triton'].removeprefix('TYPE_')} [B, {', '.join(map(str, t.dims))}]"

    return f"{tensor(decl.input)} -> {tensor(decl.output)}"


def check_serve_options(directory, host: str, ports: dict, backend: str, max_batch: int, instances: int,
                        prefix: str, tile: int | None = defaults.SERVE_TILE) -> dict:
    """Every `serve` option, before anything starts; returns the export's manifest."""
    from ..manifest import read_manifest
    from .models import check_tile
    from .repository import RUNTIMES, check_model_options

    if backend not in RUNTIMES:
        raise OptionError(f"--backend {backend!r}: expected one of {', '.join(RUNTIMES)}")
    check_model_options(prefix, max_batch, instances)
    if not Path(directory).is_dir():
        raise OptionError(f"{directory}: not a folder; expected an export folder written by vae-export")
    manifest = read_manifest(directory)  # a folder without a finished export fails here
    check_tile(tile, manifest["vae_config"])
    check_ports(host, ports)
    return manifest


def serve(directory, host: str = defaults.SERVE_HOST, http_port: int = defaults.SERVE_HTTP_PORT,
          grpc_port: int = defaults.SERVE_GRPC_PORT, metrics_port: int = defaults.SERVE_METRICS_PORT,
          backend: str = "auto", max_batch: int = defaults.TRITON_MAX_BATCH, instances: int = defaults.TRITON_INSTANCES,
          prefix: str = defaults.TRITON_PREFIX,
          dynamic_batching: bool = True, stop_event: threading.Event | None = None, out=print,
          hybrid_port: int | None = None, hybrid_max_body: int = defaults.HYBRID_MAX_BODY,
          tile: int | None = defaults.SERVE_TILE) -> int:
    """Serve the export in `directory` until SIGINT/SIGTERM (or `stop_event`); return the exit code.

    0 after a stop while serving, 130 after a stop while starting; a model that cannot load raises
    ServeError naming the model and Triton's reason. Call it from the thread that lives as long as
    the server: tritonserver is tied to it (parent-death signal). `tile`: requests larger than this many
    image pixels a side are tiled exactly where the export allows (models.serve_tiling; None: the
    model's own sample_size; 0: never).
    """
    stop_event = stop_event or threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop_event.set()) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    repo_root = server = gateway = None
    serving = False
    loaders: list = []
    try:
        from ..swap import assumed_family_note, load_runtime
        from .hybrid import Gateway
        from .models import model_decls, serve_tiling
        from .repository import write_triton_repo

        ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port,
                 **({"--hybrid-port": hybrid_port} if hybrid_port is not None else {})}
        manifest = check_serve_options(directory, host, ports, backend, max_batch, instances, prefix, tile)
        # diffusers' remote VAE protocol (hybrid.py): its options checked now, listening once Triton is ready.
        gateway = None if hybrid_port is None else Gateway(manifest, prefix, host, hybrid_port, grpc_port,
                                                           hybrid_max_body)
        install = find_triton()
        try:
            runtime, reason = load_runtime(directory, backend)  # which runtime; the models load their own
        except (ImportError, RuntimeError, OSError, ValueError) as e:  # --backend tensorrt where it cannot run
            raise ServeError(f"--backend {backend}: {first_line(e)}") from None
        out(f"runtime: {type(runtime).__name__} ({reason})")
        out(f"tiling: {serve_tiling(runtime, tile)}")
        if note := assumed_family_note(manifest):
            out(f"! {note} (vae_decode_image unscales with it)")
        resolved = runtime.backend
        del runtime
        repo_root = Path(tempfile.mkdtemp(prefix="trtvae-serve-"))
        repository = repo_root / "models"
        write_triton_repo(directory, repository, "python", prefix, max_batch, instances, resolved,
                          dynamic_batching, export_in_place=True, tile=tile)
        decls = model_decls(manifest, prefix)
        models = [d.name for d in decls]
        if stop_event.is_set():
            out("interrupted before tritonserver started")
            return 130
        server = TritonServer(repository, host, http_port, grpc_port, metrics_port, install=install,
                              explicit_models=True)
        start = time.perf_counter()
        server.start()
        out(f"starting tritonserver (pid {server.process.pid}) on {repository}")
        if not (server.wait_ready([], stop_event=stop_event) and _load_all(server, models, stop_event, loaders)):
            out("interrupted while starting: stopping tritonserver")
            return 130
        serving = True
        out(f"Triton ready in {time.perf_counter() - start:.1f} s: HTTP {server.http_url}, "
            f"gRPC {hostport(host, grpc_port)}, metrics http://{hostport(host, metrics_port)}/metrics")
        for decl in decls:
            config = server.config(decl.name)  # as Triton loaded it
            batching = "dynamic batching" if "dynamic_batching" in config else "no batching"
            count = sum(g.get("count", 1) for g in config.get("instance_group", [])) or 1
            out(f"  model {decl.name}: {describe(decl)}; max batch {config.get('max_batch_size')}, "
                f"{count} instance{'s' * (count > 1)}, {batching}")
        if gateway is not None:
            gateway.start()
            out(f"diffusers remote VAE (remote_decode/remote_encode): {gateway.describe()}")
        out("Ctrl-C (SIGINT) or SIGTERM stops the server")
        watch = _Watchdog(server, models, instances, out, stop_event, loaders)
        while not stop_event.wait(0.5):
            if not server.alive():
                raise server.exit_error()
            watch.check()
        out("stopping tritonserver")
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.stop(grace_s=None if serving else STARTING_GRACE_S)
        # A load still waiting on the stopped server ends now. Left running into interpreter exit, its HTTP
        # client crashed the process (SIGSEGV) instead of letting it exit with its code.
        for thread in loaders:
            thread.join(LOADER_JOIN_S)
        if repo_root is not None:
            shutil.rmtree(repo_root, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _load_all(server: TritonServer, models: list, stop_event: threading.Event, threads: list) -> bool:
    """Load every model (in parallel, in threads); False if stopped first, ServeError for the first that fails.

    The threads are appended to `threads`: the caller joins them once the server is stopped.
    """
    failures: dict = {}

    def load(model):
        try:
            server.load(model)
        except ServeError as e:
            failures[model] = e

    started = [threading.Thread(target=load, args=(m,), daemon=True, name=f"load {m}") for m in models]
    threads += started
    for t in started:
        t.start()
    while any(t.is_alive() for t in started) and not failures:
        if stop_event.wait(0.25):
            return False
    if failures:
        model, error = next(iter(failures.items()))
        raise ServeError(f"model {model} did not load: {error}" if model not in str(error) else str(error))
    return True


class _Watchdog:
    """Reload a model whose worker died (Triton leaves it "ready" and failing), at most once per interval.

    The reload runs in a thread: a stop request is honoured during it.
    """

    def __init__(self, server: TritonServer, models: list, instances: int, out, stop_event: threading.Event,
                 threads: list, every_s: float = 2.0, min_interval_s: float = 30.0):
        self.server, self.models, self.instances, self.out = server, models, instances, out
        self.threads = threads  # each reload's, for the caller to join once the server is stopped
        self.stop_event, self.every_s, self.min_interval_s = stop_event, every_s, min_interval_s
        self._next = time.monotonic() + every_s
        self._reloaded: dict = {}
        self._reloading: dict = {}

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        for model in self.models:
            if (model in self._reloading and self._reloading[model].is_alive()) \
                    or self.server.workers(model) >= self.instances:
                continue
            if now - self._reloaded.get(model, -self.min_interval_s) < self.min_interval_s:
                continue
            self._reloaded[model] = now
            self.out(f"model {model}: a worker process died; reloading the model")
            self._reloading[model] = threading.Thread(target=self._reload, args=(model,), daemon=True)
            self._reloading[model].start()
            self.threads.append(self._reloading[model])

    def _reload(self, model: str) -> None:
        try:
            self.server.load(model)
        except ServeError as e:
            if not self.stop_event.is_set():
                self.out(f"model {model}: reload failed ({e}); its requests fail until a restart")
        else:
            self.out(f"model {model}: reloaded")
