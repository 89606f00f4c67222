"""Every default, written once (torch-tensorrt's `_defaults.py` habit).

argparse, the options dataclasses, the rebuild command and the runtime all read these names,
so a default never drifts between the CLI and the API.
"""
MODEL = "madebyollin/sdxl-vae-fp16-fix"
PRECISION = "fp16"
COMPONENTS = "decoder,encoder"
OUT_ROOT = "engines"  # the export goes to OUT_ROOT/<model-name>/ unless --out says otherwise

# TensorRT engines
ENGINES = "auto"
BATCH = "1-4"
RESOLUTION = "512-1536"
OPT = 1024  # the image side a ranged profile is tuned for, clamped into its range
BUILDER_OPTIMIZATION_LEVEL = 3
WORKSPACE_GIB = 8.0

# Tiling, as diffusers' AutoencoderKL
TILE_OVERLAP_FACTOR = 0.25
# Exact tiling runs the mid-block attention in query-row chunks whose scores take at most this much.
ATTENTION_CHUNK_BYTES = 256 * 2**20
TILE_SAMPLE_SIZE = 1024  # used when the config has no sample_size
# TensorRT segment plans of exact tiling: the largest image side (px) their latent-resolution steps (the
# mid-block's attention, whole-tensor steps) accept; tiled steps see one window size whatever the image.
EXACT_MAX_IMAGE_SIDE = 8192

# fp16 audit
AUDIT_ROWS = 12
AUDIT_ROWS_EXPORT = 5  # the export prints a shorter table when fp16 is safe

# The runtimes `attach`, `serve` and served models load; the first is the default (TensorRT where it can run).
RUNTIMES = ("auto", "tensorrt", "onnxruntime")

# Triton
TRITON_PREFIX = "vae"
TRITON_MAX_BATCH = 4
TRITON_INSTANCES = 1
SERVE_HOST = "127.0.0.1"  # loopback unless asked: a VAE server has no authentication of its own
SERVE_HTTP_PORT = 8000
SERVE_GRPC_PORT = 8001
SERVE_METRICS_PORT = 8002
# Served models tile requests larger than this many image pixels a side, exactly (segment graphs: the same
# result as one run, at bounded memory). None: the model's own `sample_size`, which is the tile its runtime's
# `enable_tiling()` uses (TILE_SAMPLE_SIZE without one; 1024 for SDXL); 0: never tile.
SERVE_TILE = None
# diffusers' remote VAE protocol (`serve --hybrid-port`): a request body over this many bytes is refused (413)
# before it is read whole. Sized for a batch of 4 latents of a 4096² FLUX decode (4 × 16×512×512 fp32 = 64 MiB),
# which also holds an encode's PNG of a 4096² image (at most 48 MiB of raw RGB, and PNG compresses).
HYBRID_MAX_BODY = 4 * 16 * 512 * 512 * 4
HYBRID_JPEG_QUALITY = 95
# zlib level 1: about 3× faster than PIL's default 6 for a few % more bytes; a VAE server is asked for speed.
HYBRID_PNG_COMPRESS_LEVEL = 1

# Verify: latent (batch, h, w), with batch > 1, a non-square size and sizes that are not powers of two.
VERIFY_LATENT_SHAPES = ((2, 8, 8), (1, 10, 14), (1, 13, 7))
# fp16 calibration: latent (h, w); images are these times the spatial factor (64 and 96×128 px for
# SDXL), small enough for a CPU audit of the SDXL-size model, non-square so no shape is special.
CALIBRATION_LATENT_SIZES = ((8, 8), (12, 16))

# --images DIR: the user's calibration images, shrunk to this side (px) so a CPU audit of an SDXL-size
# model stays in seconds per image, and at most this many of them.
CALIBRATION_IMAGE_SIDE = 256
CALIBRATION_IMAGES = 8
