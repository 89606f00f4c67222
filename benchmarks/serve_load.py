"""Load on `vae-export serve` (a real Triton server) next to the same work on OrtVae in-process.

    python benchmarks/serve_load.py [--export DIR] [--latent 32] [--clients 1,4,16] [--requests 4]
                                    [--requests-at-one 8] [--batching on,off] [--no-hybrid]

Without --export, the SDXL-architecture demo is exported (fp16, decoder only) into a temp folder.
Each client sends --requests decodes of one 1×4×latent×latent fp16 latent (256² images at
--latent 32), back to back: over gRPC to `vae_decoder`, and (with dynamic batching on) through
`serve --hybrid-port` with diffusers' own `remote_decode`, answered as a PNG and as uint8 pixels
(`output_type="pt", partial_postprocess=True`). Measured in one run, for dynamic batching on and off,
and for OrtVae in-process with as many threads as clients: requests/s, p50/p99 latency, the server's
start-to-ready time and its peak RSS (the sum of tritonserver's and its Python stubs' peaks).
At one client the paths take turns request by request, so the machine's drift hits all alike.
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


def _interleaved(sends: dict, requests: int) -> dict:
    """One client, the paths taking turns: {name: _load-like result}."""
    latencies = {name: [] for name in sends}
    errors = {name: [] for name in sends}
    rng = np.random.default_rng(0)
    for _ in range(requests):
        for name, send in sends.items():
            start = time.perf_counter()
            try:
                send(rng)
            except Exception as e:  # noqa: BLE001 - counted and shown
                errors[name].append(repr(e)[:200])
                continue
            latencies[name].append(time.perf_counter() - start)
    out = {}
    for name, lat in latencies.items():
        out[name] = {"rps": len(lat) / sum(lat) if lat else 0.0, "p50": _percentile(lat, 50) if lat else float("nan"),
                     "p99": _percentile(lat, 99) if lat else float("nan"), "errors": len(errors[name]),
                     "first_error": errors[name][0] if errors[name] else ""}
    return out


def _serve(export: Path, batching: bool, hybrid: bool):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "serving"))
    from triton_helpers import free_port

    ports = [free_port() for _ in range(4)]
    cmd = [sys.executable, "-m", "trtvae.cli", "serve", str(export), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--dynamic-batching" if batching else "--no-dynamic-batching"]
    if hybrid:
        cmd += ["--hybrid-port", str(ports[3])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    repo = None
    for line in proc.stdout:
        if m := re.search(r"on (\S+/models)$", line.strip()):
            repo = m.group(1)
        if line.startswith("Triton ready"):
            ready_s = time.perf_counter() - start
        if line.startswith("Ctrl-C"):
            break
    else:
        raise SystemExit("vae-export serve did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep its pipe drained
    return proc, f"127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[3]}/decode", repo, ready_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=None, help="an export folder (default: export the demo)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: 256² images)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--requests-at-one", type=int, default=None,
                    help="requests per path at one client (default --requests): more samples for the p50 comparison")
    ap.add_argument("--batching", default="on,off", help="dynamic batching settings to serve with")
    ap.add_argument("--no-hybrid", action="store_true", help="skip the diffusers remote VAE (--hybrid-port) rows")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    batchings = [b.strip() == "on" for b in args.batching.split(",")]

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

    from diffusers.utils.remote_utils import remote_decode

    for i, batching in enumerate(batchings):
        hybrid = batching and not args.no_hybrid
        proc, url, decode_url, repo, ready_s = _serve(export, batching, hybrid)
        label = f"Triton gRPC, dynamic batching {'on' if batching else 'off'}"
        try:
            client = grpc.InferenceServerClient(url)

            def remote(rng, client=client):
                x = rng.standard_normal(shape).astype(np.float16)
                inp = grpc.InferInput("latent_sample", list(shape), "FP16")
                inp.set_data_from_numpy(x)
                client.infer("vae_decoder", [inp], client_timeout=600).as_numpy("sample")

            def png(rng):  # diffusers' client, as a pipeline calls it; latents already unscaled
                z = torch.from_numpy(rng.standard_normal(shape).astype(np.float16))
                remote_decode(decode_url, z, do_scaling=False, output_type="pil", image_format="png")

            def pixels(rng):
                z = torch.from_numpy(rng.standard_normal(shape).astype(np.float16))
                remote_decode(decode_url, z, do_scaling=False, output_type="pt", partial_postprocess=True,
                              return_type="pt")

            sends = {label: remote}
            if hybrid:
                sends |= {"hybrid /decode -> PNG": png, "hybrid /decode -> uint8 pt": pixels}
            if i == 0:
                sends = {"OrtVae in-process": in_process} | sends
            for send in sends.values():
                send(np.random.default_rng(0))  # first request loads the ONNX session in the stub
            for c in clients:
                results = _interleaved(sends, args.requests_at_one or args.requests) if c == 1 else \
                    {name: _load(send, c, args.requests) for name, send in sends.items()}
                for name, r in results.items():
                    server = name != "OrtVae in-process"
                    rows.append((name, c, r, ready_s if server else None, _peak_rss_mb(repo) if server else None))
            client.close()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    rows.sort(key=lambda row: row[1])

    side = args.latent * vae.spatial_factor
    print(f"\ndecode 1×4×{args.latent}×{args.latent} {vae.manifest['precision']} ({side}² images), "
          f"{args.requests} requests per client ({args.requests_at_one or args.requests} per path at one client, "
          f"taking turns), {export}")
    print(f"{'path':<36} {'clients':>7} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'errors':>6} "
          f"{'ready s':>8} {'server peak RSS MB':>19}")
    for name, c, r, ready, rss in rows:
        print(f"{name:<36} {c:>7} {r['rps']:>7.2f} {r['p50']:>7.2f} {r['p99']:>7.2f} {r['errors']:>6} "
              f"{'' if ready is None else f'{ready:.1f}':>8} {'' if rss is None else f'{rss:.0f}':>19}")
        if r["errors"]:
            print(f"    first error: {r['first_error']}")
    one = {name: r["p50"] for name, c, r, _, _ in rows if c == 1}
    grpc_p50 = one.get("Triton gRPC, dynamic batching on")
    for name in ("hybrid /decode -> PNG", "hybrid /decode -> uint8 pt"):
        if grpc_p50 and name in one:
            print(f"{name}: p50 at one client {100 * (one[name] / grpc_p50 - 1):+.1f}% over Triton gRPC directly "
                  "(target: under +10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
