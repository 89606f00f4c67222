"""`vae-export`: export a diffusers AutoencoderKL to ONNX (and TensorRT where it can), verified."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import TrtvaeError


def _export_parser() -> argparse.ArgumentParser:
    from .export.loading import DEFAULT_MODEL
    from .export.precision import PRECISIONS

    p = argparse.ArgumentParser(
        prog="vae-export",
        description="Export the encoder and decoder of a diffusers AutoencoderKL (default: the SDXL VAE fp16-fix) "
        "to ONNX with dynamic batch/height/width, verify them against PyTorch fp32, build TensorRT engines where "
        "TensorRT and a GPU are present, and write manifest.json.",
        epilog="other commands: `vae-export audit --model M` (fp16 overflow audit), "
        "`vae-export triton DIR --repo PATH` (Triton model repository). Usage errors exit 2, "
        "other errors print one `error:` line and exit 1.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hub repo id, local diffusers folder, single .safetensors file, or 'demo' (default {DEFAULT_MODEL})")
    p.add_argument("--precision", default="fp16", choices=PRECISIONS, help="tensor type inside the graphs (default fp16)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default engines/<model-name>/)")
    p.add_argument("--components", default="decoder,encoder", help="comma-separated: decoder,encoder (default both)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with the PyTorch fp32 reference and fail on a missed threshold (default on)")
    p.add_argument("--no-rescale", dest="rescale", action="store_false",
                   help="fp16: do not rescale activations exactly when the audit finds overflow "
                   "(verify then fails on the NaNs)")
    p.add_argument("--fp32-norm", action="store_true",
                   help="fp16: keep GroupNorm statistics in fp32 inside the graph (Casts around them)")
    g = p.add_argument_group("TensorRT engines (built where TensorRT and a CUDA GPU are present)")
    g.add_argument("--engines", default="auto", choices=["auto", "required", "skip"],
                   help="auto: build if possible, else say why not; required: fail without; skip: ONNX only")
    g.add_argument("--batch", default="1-4", help="batch range MIN-MAX (default 1-4)")
    g.add_argument("--resolution", default="512-1536", help="image side range in pixels MIN-MAX (default 512-1536)")
    g.add_argument("--opt", type=int, default=None, help="image side the profile is tuned for (default 1024)")
    g.add_argument("--static", default=None, metavar="WxH", help="one fixed image size instead of a range")
    g.add_argument("--profile", action="append", default=[], metavar="SPEC",
                   help="repeatable, one profile each: batch=1-4,resolution=512-1024,opt=768 or batch=1,static=1024x1024")
    g.add_argument("--builder-optimization-level", type=int, default=3, help="TensorRT builder level 0-5 (default 3)")
    g.add_argument("--workspace", type=float, default=8.0, metavar="GIB",
                   help="TensorRT workspace cap in GiB (default 8); bounds build memory in the attention block")
    p.add_argument("--subfolder", default=None, help="subfolder of a Hub repo holding the VAE (e.g. vae)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.bin/.pt weights (pickle can run code: only for sources you trust)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:
        if argv[:1] == ["triton"]:
            return _triton(argv[1:])
        if argv[:1] == ["audit"]:
            from .export.audit_cli import main as audit_main

            return audit_main(argv[1:])
        code = _export(argv)
    except TrtvaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, a path through a file: the user's to fix, in one line
        print(f"error: {e.strerror or e} ({e.filename or 'file system'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no manifest was written, the output folder is not a finished export", file=sys.stderr)
        return 130
    print(f"total {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


def _triton(argv) -> int:
    p = argparse.ArgumentParser(
        prog="vae-export triton",
        description="Write a Triton Inference Server model repository (config.pbtxt + model file per component) "
        "from a finished export folder, using only its manifest.json.",
    )
    p.add_argument("export_dir", type=Path, help="folder written by vae-export (holding manifest.json)")
    p.add_argument("--repo", type=Path, required=True, help="Triton model repository to write into")
    p.add_argument("--backend", default="tensorrt", choices=["tensorrt", "onnx"],
                   help="tensorrt: model.plan (platform tensorrt_plan); onnx: model.onnx (onnxruntime_onnx)")
    p.add_argument("--prefix", default="vae", help="model names are <prefix>_decoder and <prefix>_encoder")
    p.add_argument("--max-batch", type=int, default=4, help="max_batch_size for ONNX models (engines: their profile)")
    args = p.parse_args(argv)
    from .triton import write_triton_repo

    for folder in write_triton_repo(args.export_dir, args.repo, args.backend, args.prefix, args.max_batch):
        print(f"wrote {folder}/config.pbtxt")
    return 0


def _export(argv) -> int:
    args = _export_parser().parse_args(argv)
    from .export.pipeline import ExportOptions, run_export

    opts = ExportOptions(
        model=args.model,
        precision=args.precision,
        out=args.out,
        components=args.components,  # parsed and checked with the other options
        verify=args.verify,
        allow_pickle=args.allow_pickle,
        subfolder=args.subfolder,
        engines=args.engines,
        batch=args.batch,
        resolution=args.resolution,
        opt=args.opt,
        static=args.static,
        profile=tuple(args.profile),
        optimization_level=args.builder_optimization_level,
        workspace_gib=args.workspace,
        rescale=args.rescale,
        fp32_norm=args.fp32_norm,
    )
    run_export(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
