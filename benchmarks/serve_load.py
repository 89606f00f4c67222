"""Load on `vae-export serve` (a real Triton server) next to the same work on OrtVae in-process.

    python benchmarks/serve_load.py [--export DIR] [--latent 32] [--clients 1,4,16] [--requests 4]

Without --export, the SDXL-architecture demo is exported (fp16, decoder only) into a temp folder.
Each client sends --requests decodes of one 1×4×latent×latent fp16 latent (256² images at
--latent 32) over gRPC, back to back. Measured in one run, for dynamic batching on and off, and
for OrtVae in-process with as many threads as clients: requests/s, p50/p99 latency, the server's
start-to-ready time and its peak RSS (the sum of tritonserver's and its Python stubs' peaks).
This machine is noisy; compare the rows of one run.
"""
from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb(marker: str) -> float:
    """Sum of the peak RSS (VmHWM, which psutil does not report) of the server and its stubs."""
    from trtvae.serving.server import processes_with

    total_kb = 0
    for p in processes_with(marker):
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        total_kb += next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")), 0)
    return total_kb / 1024


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _load(send, clients: int, requests: int) -> dict:
    latencies, errors = [], []
    lock = threading.Lock()

    def client(seed):
        rng = np.random.default_rng(seed)
        for _ in range(requests):
            start = time.perf_counter()
            try:
                send(rng)
            except Exception as e:  # noqa: BLE001 - counted and shown
                errors.append(repr(e)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"rps": len(latencies) / wall, "p50": _percentile(latencies, 50) if latencies else float("nan"),
            "p99": _percentile(latencies, 99) if latencies else float("nan"), "errors": len(errors),
            "first_error": errors[0] if errors else ""}


def _serve(export: Path, batching: bool):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "serving"))
    from triton_helpers import free_port

    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "trtvae.cli", "serve", str(export), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--dynamic-batching" if batching else "--no-dynamic-batching"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    repo = None
    for line in proc.stdout:
        if m := re.search(r"on (\S+/models)$", line.strip()):
            repo = m.group(1)
        if line.startswith("Triton ready"):
            break
    else:
        raise SystemExit("vae-export serve did not start")
    return proc, f"127.0.0.1:{ports[1]}", repo, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=None, help="an export folder (default: export the demo)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: 256² images)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import torch
    import tritonclient.grpc as grpc

    from trtvae import OrtVae

    export = args.export
    if export is None:
        from trtvae.export.options import ExportOptions
        from trtvae.export.run import run_export

        export = Path(tempfile.mkdtemp(prefix="serve-load-")) / "demo"
        run_export(ExportOptions(model="demo", precision="fp16", out=export, components="decoder", verify=False,
                                 engines="skip"))
    shape = (1, 4, args.latent, args.latent)
    rows = []

    vae = OrtVae.from_pretrained(export)
    vae.decode(torch.zeros(shape))  # session created and warmed before timing, as the server's is

    def in_process(rng):
        vae.decode(torch.from_numpy(rng.standard_normal(shape).astype(np.float16)))

    for c in clients:
        rows.append(("OrtVae in-process", c, _load(in_process, c, args.requests), None, None))

    for batching in (True, False):
        proc, url, repo, ready_s = _serve(export, batching)
        try:
            client = grpc.InferenceServerClient(url)

            def remote(rng, client=client):
                x = rng.standard_normal(shape).astype(np.float16)
                inp = grpc.InferInput("latent_sample", list(shape), "FP16")
                inp.set_data_from_numpy(x)
                client.infer("vae_decoder", [inp], client_timeout=600).as_numpy("sample")

            remote(np.random.default_rng(0))  # one request before timing, as in-process
            for c in clients:
                rows.append((f"Triton, dynamic batching {'on' if batching else 'off'}", c,
                             _load(remote, c, args.requests), ready_s, _peak_rss_mb(repo)))
            client.close()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)

    side = args.latent * vae.spatial_factor
    print(f"\ndecode 1×4×{args.latent}×{args.latent} {vae.manifest['precision']} ({side}² images), "
          f"{args.requests} requests per client, {export}")
    print(f"{'path':<32} {'clients':>7} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'errors':>6} "
          f"{'ready s':>8} {'server peak RSS MB':>19}")
    for name, c, r, ready, rss in rows:
        print(f"{name:<32} {c:>7} {r['rps']:>7.2f} {r['p50']:>7.2f} {r['p99']:>7.2f} {r['errors']:>6} "
              f"{'' if ready is None else f'{ready:.1f}':>8} {'' if rss is None else f'{rss:.0f}':>19}")
        if r["errors"]:
            print(f"    first error: {r['first_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
