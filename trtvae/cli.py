"""`vae-export`: export a diffusers AutoencoderKL to ONNX (and TensorRT where it can), verified.

Every command's parser lives here: `vae-export` (export), `audit`, `triton`, `serve` and `doctor`.
The export's flags are built from `ExportOptions`' fields, so the CLI and the API cannot drift.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from . import defaults
from .errors import TrtvaeError, first_line

COMMANDS = ("audit", "triton", "serve", "doctor")
# What `vae-export audit` shares with the export, flag for flag.
_AUDIT_SHARED = ("model", "family", "components", "subfolder", "allow_pickle", "images")


def _add_options(parser: argparse.ArgumentParser, cls, only=None) -> None:
    """One argparse argument per dataclass field that carries `cli` metadata."""
    groups = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("cli")
        if meta is None or (only is not None and f.name not in only):
            continue
        target = parser
        if meta["group"]:
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"],
                                                                    parser.add_argument_group(meta["group"]))
        kwargs = dict(meta["kwargs"])
        if kwargs.get("action") == "boolean_optional":
            kwargs["action"] = argparse.BooleanOptionalAction
        default = f.default
        if kwargs.get("action") == "append":
            default = list(default)
        target.add_argument(*meta["flags"], dest=f.name, default=default, **kwargs)


def _options_from(args: argparse.Namespace, cls, **extra):
    names = {f.name for f in dataclasses.fields(cls) if "cli" in f.metadata}
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)}, **extra)


def _tile(text: str) -> int:
    """--tile: whole image pixels, at least 0 (the export's own multiple is checked against its manifest)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 (no tiling) or the tile side in image pixels, "
                                         "e.g. 1024")
    return value


_TILE_HELP = ("requests larger than this many image pixels a side are tiled exactly, from the export's segment "
              "graphs: the same result as an untiled run at bounded memory (default: the model's own "
              "sample_size, e.g. 1024 for SDXL; 0: never tile). An export without segment graphs (or, for "
              "TRTVae, without their plans) runs untiled: blend tiling would change the image")


def export_parser() -> argparse.ArgumentParser:
    from .export.options import ExportOptions

    p = argparse.ArgumentParser(
        prog="vae-export",
        description="Export the encoder and decoder of a diffusers AutoencoderKL (default: the SDXL VAE fp16-fix) "
        "to ONNX with dynamic batch/height/width, verify them against PyTorch fp32, build TensorRT engines where "
        "TensorRT and a GPU are present, and write manifest.json.",
        epilog="other commands: `vae-export audit --model M` (fp16 overflow audit), "
        "`vae-export triton DIR --repo PATH` (Triton model repository), `vae-export serve DIR` (a Triton server), "
        "`vae-export doctor [DIR]` (what this machine has, and whether DIR runs on it). Usage errors exit 2, "
        "other errors print one `error:` line and exit 1.",
    )
    _add_options(p, ExportOptions)
    return p


def audit_parser() -> argparse.ArgumentParser:
    from .export.options import ExportOptions

    p = argparse.ArgumentParser(
        prog="vae-export audit",
        description="Run the fp32 model on calibration images and latents, record each layer's largest activation "
        "and each GroupNorm's largest squared deviation, and say whether fp16 overflows (65504) and what to do.",
    )
    _add_options(p, ExportOptions, only=_AUDIT_SHARED)
    p.add_argument("--json", type=Path, default=None, help="write the per-layer figures and the verdict here")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of magnitude per layer (default: next to --json, else ./<model>-fp16-audit.png)")
    p.add_argument("--rows", type=int, default=defaults.AUDIT_ROWS,
                   help="table rows: the layers with the least margin (default %(default)s)")
    p.add_argument("--rescale", action="store_true",
                   help="also rescale a copy and show the maxima after (what vae-export --precision fp16 would do)")
    return p


def triton_parser() -> argparse.ArgumentParser:
    from .serving.repository import BACKENDS, RUNTIMES

    p = argparse.ArgumentParser(
        prog="vae-export triton",
        description="Write a Triton Inference Server model repository (config.pbtxt + model file per component) "
        "from a finished export folder, using only its manifest.json.",
    )
    p.add_argument("export_dir", type=Path, help="folder written by vae-export (holding manifest.json)")
    p.add_argument("--repo", type=Path, required=True, help="Triton model repository to write into")
    p.add_argument("--backend", default=BACKENDS[0], choices=BACKENDS,
                   help="tensorrt: model.plan (platform tensorrt_plan); onnx: model.onnx (onnxruntime_onnx); "
                        "python: trtvae's decoder, encoder and decode_image models on Triton's Python backend, "
                        "with the export copied in (self-contained)")
    p.add_argument("--prefix", default=defaults.TRITON_PREFIX,
                   help="model names are <prefix>_decoder, <prefix>_encoder (and <prefix>_decode_image for "
                        "python; default %(default)s)")
    p.add_argument("--max-batch", type=int, default=defaults.TRITON_MAX_BATCH,
                   help="max_batch_size for ONNX and Python models (engines: their profile; default %(default)s)")
    p.add_argument("--instances", type=int, default=defaults.TRITON_INSTANCES,
                   help="python: model instances per model (default %(default)s)")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="python: the runtime each model loads in the server (default auto: TensorRT where its "
                        "engines can run, else ONNX Runtime)")
    p.add_argument("--tile", type=_tile, default=defaults.SERVE_TILE, metavar="PX", help="python: " + _TILE_HELP)
    return p


def serve_parser() -> argparse.ArgumentParser:
    from .serving.repository import RUNTIMES

    p = argparse.ArgumentParser(
        prog="vae-export serve",
        description="Serve an export folder through a real Triton Inference Server (the one the `triton` extra, "
        "nvidia-pytriton, bundles) until Ctrl-C/SIGTERM: models <prefix>_decoder, <prefix>_encoder and "
        "<prefix>_decode_image (scaled FP32 latents in, UINT8 pixels out), all with dynamic batching.",
        epilog="Each model loads its runtime and runs one warm-up inference before Triton calls it ready. Options "
        "are checked before anything starts; a bad option, a port in use or a model that cannot load (e.g. a file "
        "changed after export) is one `error:` line and exit 1. Requests the runtime refuses (shape, NaN/inf) "
        "get INVALID_ARG (HTTP 400), server faults INTERNAL (HTTP 500).",
    )
    p.add_argument("export_dir", type=Path, help="folder written by vae-export (holding manifest.json)")
    p.add_argument("--host", default=defaults.SERVE_HOST, help="address to listen on (default %(default)s)")
    p.add_argument("--http-port", type=int, default=defaults.SERVE_HTTP_PORT, help="default %(default)s")
    p.add_argument("--grpc-port", type=int, default=defaults.SERVE_GRPC_PORT, help="default %(default)s")
    p.add_argument("--metrics-port", type=int, default=defaults.SERVE_METRICS_PORT, help="default %(default)s")
    p.add_argument("--backend", default=RUNTIMES[0], choices=RUNTIMES,
                   help="auto: TRTVae where the folder has engines for this GPU, else OrtVae (default auto)")
    p.add_argument("--max-batch", type=int, default=defaults.TRITON_MAX_BATCH,
                   help="largest batch Triton's dynamic batcher forms (default %(default)s)")
    p.add_argument("--instances", type=int, default=defaults.TRITON_INSTANCES,
                   help="model instances per model (default %(default)s)")
    p.add_argument("--prefix", default=defaults.TRITON_PREFIX, help="model name prefix (default %(default)s)")
    p.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="Triton's dynamic batching (default on)")
    p.add_argument("--hybrid-port", type=int, default=None,
                   help="also serve diffusers' remote VAE protocol (remote_decode/remote_encode) at "
                        "http://HOST:PORT/decode and /encode, through the Triton models (default off)")
    p.add_argument("--hybrid-max-body", type=int, default=defaults.HYBRID_MAX_BODY,
                   help="bytes: a larger request body is refused (413) before it is read (default %(default)s)")
    p.add_argument("--tile", type=_tile, default=defaults.SERVE_TILE, metavar="PX", help=_TILE_HELP)
    return p


def doctor_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-export doctor",
        description="Print what this machine has (torch and its CUDA, GPU, compute capability, driver, TensorRT, "
        "Polygraphy, ONNX Runtime and its providers) and what vae-export would build here; given an export folder, "
        "whether each file checks out and each engine can run here, with the command that rebuilds them. "
        "Builds and runs nothing.",
        epilog="exit 0 when everything the folder needs is present here (a folder without engines that OrtVae can "
        "run counts), 1 otherwise (e.g. engines built for another GPU or TensorRT version, or no GPU for them).",
    )
    p.add_argument("export_dir", type=Path, nargs="?", default=None,
                   help="folder written by vae-export (holding manifest.json); omit to check the machine only")
    p.add_argument("--json", action="store_true", help="print the report as JSON (for bug reports and scripts)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    command = argv[0] if argv[:1] and argv[0] in COMMANDS else "export"
    try:
        run = {"export": _export, "audit": _audit, "triton": _triton, "serve": _serve, "doctor": _doctor}[command]
        code = run(argv if command == "export" else argv[1:])
    except TrtvaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, a path through a file: the user's to fix, in one line
        print(f"error: {e.strerror or e} ({e.filename or 'file system'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # CPython marks a KeyboardInterrupt that leaves a string exec (dataclasses build methods that way while
        # torch.export imports) as unhandled even once caught; under `python -m` it then dies by SIGINT instead of
        # returning 130. A string exec that ends normally clears the mark.
        exec("pass", {})
        print("interrupted" + (": an unfinished export leaves its output folder as it was" if command == "export"
                               else ""), file=sys.stderr)
        return 130
    except RuntimeError as e:  # a CUDA out-of-memory the stages did not name: still one line, never a traceback
        if type(e).__name__ != "OutOfMemoryError":
            raise
        print(f"error: out of GPU memory ({first_line(e, 160)}): lower --batch or --resolution, or --workspace",
              file=sys.stderr)
        return 1
    if command == "export":
        print(f"total {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


def _export(argv) -> int:
    from .export.options import ExportOptions
    from .export.run import run_export

    run_export(_options_from(export_parser().parse_args(argv), ExportOptions))
    return 0


def _audit(argv) -> int:
    args = audit_parser().parse_args(argv)
    from .components import parse_components
    from .export.fp16.calibration import list_images
    from .export.fp16.safety import audit_command
    from .export.loading import load_vae
    from .export.progress import stage

    components = parse_components(args.components)
    if args.images is not None:
        list_images(args.images)  # before the model is loaded
    with stage("load model") as info:
        loaded = load_vae(args.model, allow_pickle=args.allow_pickle, subfolder=args.subfolder, family=args.family)
        info["detail"] = f"{loaded.source['kind']}: {loaded.source['model']}"
    audit_command(loaded, components, args.json, args.plot, args.rows, args.rescale, images=args.images)
    return 0


def _triton(argv) -> int:
    args = triton_parser().parse_args(argv)
    from .serving.repository import write_triton_repo

    for folder in write_triton_repo(args.export_dir, args.repo, args.backend, args.prefix, args.max_batch,
                                    instances=args.instances, runtime=args.runtime, tile=args.tile):
        print(f"wrote {folder}/config.pbtxt")
    return 0


def _serve(argv) -> int:
    args = serve_parser().parse_args(argv)
    from functools import partial

    from .serving.server import serve

    return serve(args.export_dir, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port, backend=args.backend, max_batch=args.max_batch,
                 instances=args.instances, prefix=args.prefix, dynamic_batching=args.dynamic_batching,
                 out=partial(print, flush=True), hybrid_port=args.hybrid_port, hybrid_max_body=args.hybrid_max_body,
                 tile=args.tile)


def _doctor(argv) -> int:
    args = doctor_parser().parse_args(argv)
    from .doctor import doctor_command

    return doctor_command(args.export_dir, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
