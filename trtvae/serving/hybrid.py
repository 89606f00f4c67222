"""`vae-export serve --hybrid-port P`: diffusers' remote VAE endpoints (`/decode`, `/encode`) in front of Triton.

A Starlette app under uvicorn, in a thread of the `serve` process (so SIGINT/SIGTERM stop it with the rest).
Each request becomes one call on a served Triton model over gRPC (tritonclient's asyncio client), so
Triton's dynamic batching, instances and the runtime's checks apply and there is one serving path: the
gateway runs no VAE itself, only the protocol's parsing and diffusers' `VaeImageProcessor` post-processing
(in a thread pool, so requests are served concurrently). Decode calls `<prefix>_decoder` on latents the
gateway has unscaled as the client asked; encode calls `<prefix>_encoder` and answers the posterior mean
(deterministic: the same image always gives the same latents; no sampling).

Every answer that is not 2xx is JSON, `{"error": message}`, which the client raises as RuntimeError:
4xx for the request (Triton's INVALID_ARG included), 5xx for the server.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time

import numpy as np

from .. import defaults
from ..components import DECODER, ENCODER
from .triton_process import ServeError, hostport
from .hybrid_protocol import HybridError, VaeFacts, image_processor, pack_decode, pack_encode, parse_decode, \
    parse_encode

logger = logging.getLogger("trtvae.serving.hybrid")
# Triton's gRPC status → HTTP: the request's fault, or the server's.
_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAVAILABLE": 503, "NOT_FOUND": 503,
           "RESOURCE_EXHAUSTED": 503, "DEADLINE_EXCEEDED": 504}


async def read_body(request, limit: int) -> bytearray:
    """The body, refused with 413 as soon as Content-Length or the bytes counted so far pass `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HybridError(400, f"Content-Length: {declared!r} is not a byte count")
        if int(declared) > limit:
            raise HybridError(413, f"request body of {int(declared)} bytes is over this server's limit of {limit} "
                                   "bytes (vae-export serve --hybrid-max-body)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HybridError(413, f"request body is over this server's limit of {limit} bytes "
                                   "(vae-export serve --hybrid-max-body)")
    return body


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def create_app(manifest: dict, prefix: str, triton_grpc: str, max_body: int = defaults.HYBRID_MAX_BODY):
    """The ASGI app: POST /decode and /encode, GET / (what is served). `triton_grpc` is host:port."""
    import tritonclient.grpc as grpcclient
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from tritonclient.grpc.aio import InferenceServerClient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    from .models import model_decls

    facts = VaeFacts.from_manifest(manifest)
    decls = {d.kind: d for d in model_decls(manifest, prefix)}
    processor = image_processor(facts)
    state: dict = {}

    async def infer(kind: str, array: np.ndarray) -> np.ndarray:
        if kind not in decls:
            raise HybridError(404, f"this export has no {kind} (its components: {', '.join(facts.components)})")
        decl = decls[kind]
        tensor = grpcclient.InferInput(decl.input.name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        try:
            result = await state["client"].infer(decl.name, [tensor],
                                                 outputs=[grpcclient.InferRequestedOutput(decl.output.name)])
        except InferenceServerException as e:
            code = str(e.status() or "").rsplit(".", 1)[-1]
            raise HybridError(_STATUS.get(code, 500), f"{decl.name}: {e.message()}") from None
        return result.as_numpy(decl.output.name)

    def answering(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except HybridError as e:
                return _error(e.status, str(e))
            except Exception as e:  # noqa: BLE001 - a fault of ours: 500, logged with its traceback
                logger.exception("hybrid gateway: %s %s failed", request.method, request.url.path)
                return _error(500, f"internal server error: {type(e).__name__}: {e}")
        return endpoint

    async def decode(request):
        body = await read_body(request, max_body)
        parsed = await run_in_threadpool(parse_decode, request.query_params, request.headers.get("accept"), body,
                                         facts)
        sample = await infer(DECODER, parsed.latents)
        content, media, headers = await run_in_threadpool(pack_decode, sample, parsed, processor)
        return Response(content, media_type=media, headers=headers)

    async def encode(request):
        body = await read_body(request, max_body)
        parsed = await run_in_threadpool(parse_encode, request.query_params, body, facts, processor)
        parameters = await infer(ENCODER, parsed.image)
        content, headers = await run_in_threadpool(pack_encode, parameters, parsed)
        return Response(content, media_type="tensor/binary", headers=headers)

    async def index(request):
        return JSONResponse({"protocol": "diffusers remote VAE (diffusers.utils.remote_utils)",
                             "decode": DECODER in decls, "encode": ENCODER in decls,
                             "latent_channels": facts.latent_channels, "spatial_factor": facts.factor,
                             "scaling_factor": facts.config.get("scaling_factor"),
                             "shift_factor": facts.config.get("shift_factor"), "max_body_bytes": max_body})

    async def http_error(request, exc):  # unknown path, wrong method: JSON too
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail} "
                                       "(this server answers POST /decode, POST /encode, GET /)")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["client"] = InferenceServerClient(triton_grpc)
        try:
            yield
        finally:
            await state["client"].close()

    routes = [Route("/decode", answering(decode), methods=["POST"]),
              Route("/encode", answering(encode), methods=["POST"]), Route("/", index, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


class Gateway:
    """The app under uvicorn in a daemon thread; `start` returns once it listens, `stop` once it has stopped."""

    def __init__(self, manifest: dict, prefix: str, host: str, port: int, grpc_port: int,
                 max_body: int = defaults.HYBRID_MAX_BODY):
        if max_body <= 0:
            raise ServeError(f"--hybrid-max-body {max_body}: expected a positive number of bytes")
        self.host, self.port = host, port
        self.components = tuple(manifest["components"])
        self._app = create_app(manifest, prefix, triton_address(host, grpc_port), max_body)
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{hostport(self.host, self.port)}"

    def describe(self) -> str:
        ends = [f"{self.url}/{e}" for e, c in (("decode", DECODER), ("encode", ENCODER)) if c in self.components]
        return ", ".join(ends)

    def start(self, timeout_s: float = 30.0) -> None:
        import uvicorn

        config = uvicorn.Config(self._app, host=self.host, port=self.port, log_config=None, log_level="warning",
                                access_log=False, lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="trtvae-hybrid-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"--hybrid-port {self.port}: the gateway could not listen on {self.url}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._server = self._thread = None


def triton_address(host: str, grpc_port: int) -> str:
    """Where the gateway reaches Triton's gRPC: a wildcard listen address is reached on loopback."""
    return hostport({"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host), grpc_port)
