"""`vae-export serve --hybrid-port`: diffusers' own `remote_decode` / `remote_encode` against the real server.

Two servers on loopback, one per latent layout, each started once for the module: the tiny SDXL-layout
(4-channel) fp16 export, and a tiny FLUX-layout (16 channels, shift factor, no quant convs) fp32 export.
Every answer is compared with OrtVae in-process on the same export, with diffusers' VaeImageProcessor for
pixels; bad requests must raise the client's RuntimeError with a message, and the server must keep answering.
"""
from __future__ import annotations

import http.client
import json
import signal
import socket
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="needs the triton extra: pip install -e '.[triton]'")
pytest.importorskip("uvicorn", reason="needs the triton extra: pip install -e '.[triton]'")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.utils import remote_utils  # noqa: E402
from diffusers.utils.remote_utils import remote_decode, remote_encode  # noqa: E402
from PIL import Image  # noqa: E402
from triton_helpers import free_port, processes_mentioning, run_threads, serve_ready  # noqa: E402

from trtvae import OrtVae  # noqa: E402

READY_TIMEOUT_S = 300
SDXL_SCALE = 0.13025  # the client's factor, deliberately not the tiny config's 0.5: the server must use it
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159
SMALL_LIMIT = 1_000_000  # --hybrid-max-body of the SDXL server: 1×4×256×256 fp32 latents (1 MiB) are over it


def _start(export, *extra):
    ports = [free_port() for _ in range(4)]
    info = serve_ready(export, "--hybrid-port", ports[3], *extra, ports=ports[:3], timeout_s=READY_TIMEOUT_S)
    info |= {"url": f"http://127.0.0.1:{ports[3]}", "port": ports[3]}
    return info


def _stop(info):
    if info["proc"].poll() is None:
        info["proc"].send_signal(signal.SIGINT)
        info["proc"].wait(timeout=90)


@pytest.fixture(scope="module")
def sdxl(tiny_fp16):
    info = _start(tiny_fp16, "--hybrid-max-body", str(SMALL_LIMIT))
    info["ort"] = OrtVae.from_pretrained(tiny_fp16)
    yield info
    _stop(info)


@pytest.fixture(scope="module")
def flux_export(tmp_path_factory):
    from family_models import family_vae

    from trtvae.export.options import ExportOptions
    from trtvae.export.run import run_export

    source = tmp_path_factory.mktemp("tiny_flux")
    family_vae("flux").save_pretrained(source)
    out = tmp_path_factory.mktemp("tiny_flux_fp32")
    run_export(ExportOptions(model=str(source), precision="fp32", out=out, verify=False))
    return out


@pytest.fixture(scope="module")
def flux(flux_export):
    info = _start(flux_export)
    info["ort"] = OrtVae.from_pretrained(flux_export)
    yield info
    _stop(info)


def _z(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _pixels(ort, latents):
    """OrtVae decode + diffusers' VaeImageProcessor: uint8 [B, H, W, 3], the in-process reference."""
    sample = ort.decode(latents).sample.float()
    return (VaeImageProcessor(vae_scale_factor=ort.spatial_factor).postprocess(sample, output_type="np") * 255) \
        .round().astype(np.uint8)


def _close(a, b, equal=0.99):
    """Within one grey level, and mostly equal."""
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > equal, (diff.max(), (diff == 0).mean())


def test_banner_prints_the_endpoints(sdxl):
    assert f"diffusers remote VAE (remote_decode/remote_encode): {sdxl['url']}/decode, {sdxl['url']}/encode" \
        in sdxl["banner"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_pt_is_the_decoded_tensor(sdxl, dtype):
    z = _z((2, 4, 8, 12), seed=1, dtype=dtype)
    out = remote_decode(f"{sdxl['url']}/decode", z, scaling_factor=SDXL_SCALE, output_type="pt", return_type="pt")
    ref = sdxl["ort"].decode(z.float() / SDXL_SCALE).sample
    assert out.dtype == torch.float16 and out.shape == (2, 3, 16, 24)  # the export's I/O dtype, in [-1, 1]
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    # The client's own post-processing of that tensor (processor given, return_type="pil"); it rounds in fp16.
    images = remote_decode(f"{sdxl['url']}/decode", z, scaling_factor=SDXL_SCALE, output_type="pt",
                           processor=VaeImageProcessor(vae_scale_factor=2))
    _close(np.asarray(images), _pixels(sdxl["ort"], z.float() / SDXL_SCALE)[0], equal=0.9)


def test_pt_with_partial_postprocess_is_uint8_pixels(sdxl):
    z = _z((2, 4, 6, 10), seed=2)
    out = remote_decode(f"{sdxl['url']}/decode", z, scaling_factor=SDXL_SCALE, output_type="pt",
                        partial_postprocess=True, return_type="pt")
    assert out.dtype == torch.uint8 and out.shape == (2, 12, 20, 3)
    _close(out.numpy(), _pixels(sdxl["ort"], z / SDXL_SCALE))


def test_pil_png_equals_ortvae_and_diffusers_postprocessing(sdxl):
    z = _z((1, 4, 16, 12), seed=3, dtype=torch.float16)
    image = remote_decode(f"{sdxl['url']}/decode", z, scaling_factor=SDXL_SCALE, output_type="pil",
                          image_format="png")
    assert image.format == "png" and image.size == (24, 32)
    _close(np.asarray(image), _pixels(sdxl["ort"], z.float() / SDXL_SCALE)[0])


def test_pil_jpeg(sdxl):
    z = _z((1, 4, 16, 16), seed=4)
    image = remote_decode(f"{sdxl['url']}/decode", z, scaling_factor=SDXL_SCALE, output_type="pil",
                          image_format="jpg")
    assert image.format == "jpeg" and image.size == (32, 32)

    def psnr(latents):
        mse = np.mean((np.asarray(image).astype(float) - _pixels(sdxl["ort"], latents)[0]) ** 2)
        return 10 * np.log10(255 ** 2 / max(mse, 1e-9))

    # A faithful JPEG of this image (full colour resolution: 4:2:0 would give about 19 dB on these noisy pixels),
    # far closer to it than to the decode of other latents.
    assert psnr(z / SDXL_SCALE) > 30 and psnr(z / SDXL_SCALE) > psnr(_z((1, 4, 16, 16), seed=44) / SDXL_SCALE) + 10


def test_pil_with_a_processor_gets_pixels_in_unit_range(sdxl):
    """output_type='pil' with a processor: the client asks for a tensor in [0, 1] and makes the images itself."""
    z = _z((2, 4, 8, 8), seed=5)
    images = remote_decode(f"{sdxl['url']}/decode", z, scaling_factor=SDXL_SCALE, output_type="pil",
                           processor=VaeImageProcessor(vae_scale_factor=2))
    assert len(images) == 2
    _close(np.stack([np.asarray(i) for i in images]), _pixels(sdxl["ort"], z / SDXL_SCALE))


def test_no_factor_means_the_latents_are_used_as_given_and_do_scaling_means_the_config(sdxl):
    z = _z((1, 4, 8, 8), seed=6)
    url, ort = f"{sdxl['url']}/decode", sdxl["ort"]
    as_given = remote_decode(url, z, do_scaling=False, output_type="pt", return_type="pt")
    np.testing.assert_array_equal(as_given.numpy(), ort.decode(z).sample.numpy())
    # The client's deprecated default (do_scaling=True, no factor): the served VAE's own scaling_factor.
    by_config = remote_decode(url, z, output_type="pt", return_type="pt")
    np.testing.assert_array_equal(by_config.numpy(), ort.decode(z / ort.config.scaling_factor).sample.numpy())


def test_unpack_is_fluxpipelines():
    from diffusers import FluxPipeline

    from trtvae.serving.hybrid_protocol import unpack_latents

    for b, c, h, w, factor in ((1, 16, 8, 12, 2), (2, 16, 4, 4, 8), (1, 4, 6, 2, 8)):
        packed = FluxPipeline._pack_latents(_z((b, c, h, w), seed=h), b, c, h, w)
        height, width = h * factor + (factor - 1), w * factor  # the pipeline rounds height down as well
        np.testing.assert_array_equal(unpack_latents(packed, height, width, factor, c).numpy(),
                                      FluxPipeline._unpack_latents(packed, height, width, factor).numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_packed_flux_latents_with_height_and_width(flux, dtype):
    from diffusers import FluxPipeline

    z4 = _z((1, 16, 8, 12), seed=7)
    packed = FluxPipeline._pack_latents(z4, 1, 16, 8, 12).to(dtype)
    out = remote_decode(f"{flux['url']}/decode", packed, height=16, width=24, scaling_factor=FLUX_SCALE,
                        shift_factor=FLUX_SHIFT, output_type="pt", return_type="pt")
    unpacked = FluxPipeline._unpack_latents(packed.float(), 16, 24, 2)
    ref = flux["ort"].decode(unpacked / FLUX_SCALE + FLUX_SHIFT).sample
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 24)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=0, atol=1e-5)
    image = remote_decode(f"{flux['url']}/decode", packed, height=16, width=24, scaling_factor=FLUX_SCALE,
                          shift_factor=FLUX_SHIFT, output_type="pil", image_format="png")
    _close(np.asarray(image), _pixels(flux["ort"], unpacked / FLUX_SCALE + FLUX_SHIFT)[0])


def _in_process_latents(info, pixels01: torch.Tensor, scale, shift=None):
    """OrtVae's posterior mean of an image in [0, 1], scaled as a pipeline does."""
    mean = info["ort"].encode(pixels01 * 2 - 1).latent_dist.mean.float()
    return ((mean - (shift or 0.0)) * scale).numpy()


@pytest.mark.parametrize("layout", ["sdxl", "flux"])
def test_encode_a_pil_image_is_the_scaled_posterior_mean(request, layout):
    info = request.getfixturevalue(layout)
    scale, shift = (SDXL_SCALE, None) if layout == "sdxl" else (FLUX_SCALE, FLUX_SHIFT)
    rng = np.random.default_rng(8)
    image = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    latents = remote_encode(f"{info['url']}/encode", image, scaling_factor=scale, shift_factor=shift)
    ref = _in_process_latents(info, torch.from_numpy(np.asarray(image) / 255).permute(2, 0, 1)[None].float(),
                              scale, shift)
    channels = 4 if layout == "sdxl" else 16
    assert latents.shape == (1, channels, 12, 16)
    assert latents.dtype == (torch.float16 if layout == "sdxl" else torch.float32)
    np.testing.assert_allclose(latents.float().numpy(), ref, rtol=2e-3, atol=2e-3)
    again = remote_encode(f"{info['url']}/encode", image, scaling_factor=scale, shift_factor=shift)
    np.testing.assert_array_equal(again.numpy(), latents.numpy())  # the mean: deterministic


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_encode_a_tensor(sdxl, dtype):
    x = torch.rand((2, 3, 16, 8), generator=torch.Generator().manual_seed(9)).to(dtype)
    latents = remote_encode(f"{sdxl['url']}/encode", x, scaling_factor=SDXL_SCALE)
    assert latents.shape == (2, 4, 8, 4)
    np.testing.assert_allclose(latents.float().numpy(), _in_process_latents(sdxl, x.float(), SDXL_SCALE),
                               rtol=2e-3, atol=2e-3)


class _Recorder:
    """requests.post as the client calls it, recording each answer's status (and cutting the body if asked)."""

    def __init__(self, real, cut: int = 0):
        self.real, self.cut, self.status = real, cut, []

    def __call__(self, url, **kwargs):
        if self.cut:
            kwargs["data"] = kwargs["data"][: -self.cut]
        response = self.real(url, **kwargs)
        self.status.append(response.status_code)
        return response


BAD_DECODES = [
    ("nan", dict(tensor=torch.full((1, 4, 8, 8), float("nan"))), 0, 400, r"256 of 256 values are NaN or inf"),
    ("channels", dict(tensor=torch.zeros(1, 3, 8, 8)), 0, 400, r"\[1, 3, 8, 8\].*\[B, 4, h, w\]"),
    ("truncated", dict(tensor=torch.zeros(1, 4, 8, 8)), 100, 400, r"1024 bytes, the body has 924"),
    ("mp4", dict(tensor=torch.zeros(1, 4, 8, 8), output_type="mp4", return_type="mp4"), 0, 400, r"mp4.*image VAE"),
    ("dtype", dict(tensor=torch.zeros(1, 4, 8, 8, dtype=torch.int32)), 0, 400, r"unknown dtype 'int32'"),
    ("too-large", dict(tensor=torch.zeros(1, 4, 256, 256)), 0, 413, r"1048576 bytes is over .* limit of 1000000"),
    # Triton's own refusal (INVALID_ARG) is the client's fault too: 400, with Triton's message.
    ("batch", dict(tensor=torch.zeros(5, 4, 4, 4)), 0, 400, r"vae_decoder: .*batch-size must be <= 4"),
    ("packed-no-size", dict(tensor=torch.zeros(1, 16, 16)), 0, 400, r"need the height and width"),
]


@pytest.mark.parametrize("case,kwargs,cut,status,message", BAD_DECODES, ids=[c[0] for c in BAD_DECODES])
def test_bad_decodes_raise_the_clients_error_and_the_server_keeps_answering(sdxl, monkeypatch, case, kwargs, cut,
                                                                             status, message):
    recorder = _Recorder(remote_utils.requests.post, cut)
    monkeypatch.setattr(remote_utils.requests, "post", recorder)
    kwargs = {"output_type": "pt", "return_type": "pt", **kwargs}
    if case == "packed-no-size":  # the client itself insists on height/width; a client that does not gets this
        monkeypatch.setattr(remote_utils, "check_inputs_decode", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match=message) as e:
        remote_decode(f"{sdxl['url']}/decode", **kwargs)
    assert recorder.status == [status] and "error" in e.value.args[0]
    z = _z((1, 4, 4, 4), seed=10)
    monkeypatch.undo()
    out = remote_decode(f"{sdxl['url']}/decode", z, do_scaling=False, output_type="pt", return_type="pt")
    np.testing.assert_array_equal(out.numpy(), sdxl["ort"].decode(z).sample.numpy())


def test_bad_encodes_raise_the_clients_error(sdxl):
    import requests

    url = f"{sdxl['url']}/encode"
    with pytest.raises(RuntimeError, match=r"image of 33×32 px: width and height must be multiples of 2"):
        remote_encode(url, Image.new("RGB", (33, 32)))
    x = torch.zeros(1, 3, 8, 8)
    x[0, :, 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"image tensor: 3 of 192 values are NaN or inf"):
        remote_encode(url, x)
    # Neither an image nor a tensor (no shape): the client cannot send that, so plain requests.
    response = requests.post(url, data=b"not a png")
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert "not an image PIL can read" in response.json()["error"]


def _raw(port, method, path, headers, body=b""):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    if body:
        conn.send(body)
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def test_too_large_bodies_are_refused_before_they_are_read(sdxl):
    # Content-Length says 1 TB and nothing follows: the answer comes at once, so nothing was waited for.
    start = time.monotonic()
    status, data = _raw(sdxl["port"], "POST", "/decode?shape=1&shape=4&shape=8&shape=8&dtype=float32",
                        {"Content-Length": str(10 ** 12)})
    assert status == 413 and "10000000000" in data["error"] and time.monotonic() - start < 10
    # Chunked, no length: counted as it streams, refused once past the limit.
    chunk = b"0" * 100_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(12)) + b"0\r\n\r\n"
    status, data = _raw(sdxl["port"], "POST", "/encode", {"Transfer-Encoding": "chunked"}, body)
    assert status == 413 and "over this server's limit of 1000000 bytes" in data["error"]
    status, data = _raw(sdxl["port"], "GET", "/nowhere", {})
    assert status == 404 and "POST /decode" in data["error"]


def test_eight_clients_at_once_get_their_own_answers(sdxl):
    url, ort = sdxl["url"], sdxl["ort"]
    inputs = {(t, k): _z((1, 4, 6, 6), seed=100 + 10 * t + k) for t in range(8) for k in range(3)}
    results = {}

    def client(t):
        for k in range(3):
            z = inputs[(t, k)]
            if (t + k) % 3 == 0:
                results[(t, k)] = remote_decode(f"{url}/decode", z, scaling_factor=SDXL_SCALE, output_type="pt",
                                                return_type="pt").numpy()
            elif (t + k) % 3 == 1:
                results[(t, k)] = np.asarray(remote_decode(f"{url}/decode", z, scaling_factor=SDXL_SCALE,
                                                           output_type="pil", image_format="png"))
            else:
                image = Image.fromarray((np.asarray(z[0, :3].permute(1, 2, 0)).clip(0, 1) * 255).astype(np.uint8))
                results[(t, k)] = (image, remote_encode(f"{url}/encode", image, scaling_factor=SDXL_SCALE))

    errors = run_threads(client, 8)
    assert not errors and sorted(results) == sorted(inputs)
    for (t, k), out in results.items():
        z = inputs[(t, k)]
        if (t + k) % 3 == 0:
            np.testing.assert_array_equal(out, ort.decode(z / SDXL_SCALE).sample.numpy())
        elif (t + k) % 3 == 1:
            _close(out, _pixels(ort, z / SDXL_SCALE)[0])
        else:
            image, latents = out
            pixels = torch.from_numpy(np.asarray(image) / 255).permute(2, 0, 1)[None].float()
            np.testing.assert_allclose(latents.float().numpy(), _in_process_latents(sdxl, pixels, SDXL_SCALE),
                                       rtol=2e-3, atol=2e-3)


def test_sigint_stops_the_gateway_with_the_server_and_leaves_no_process(sdxl):
    proc = sdxl["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    deadline = time.monotonic() + 30
    while processes_mentioning(sdxl["repo"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(sdxl["repo"]) == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", sdxl["port"]), timeout=5):
        pass


# --- refused before anything starts ---------------------------------------------------------------
def test_hybrid_port_in_use_and_a_bad_limit_are_one_error_line(tiny_fp16, capsys):
    from trtvae.cli import main

    ports = [str(free_port()) for _ in range(3)]
    common = ["serve", str(tiny_fp16), "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main([*common, "--hybrid-port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --hybrid-port {port}: cannot listen on 127.0.0.1:{port}")
    assert main([*common, "--hybrid-port", str(free_port()), "--hybrid-max-body", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --hybrid-max-body 0: expected a positive number of bytes"]
