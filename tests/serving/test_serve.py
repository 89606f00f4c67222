"""`vae-export serve` against the real Triton server bundled by the `triton` extra, on loopback.

One server for the module (started here, stopped at the end): results over HTTP and gRPC equal
OrtVae in-process, decode_image equals diffusers' post-processing, bad requests get the runtime's
message and leave the server ready, concurrent clients get their own answers, a killed model
worker gives errors and never a hang or a wrong answer, and SIGINT leaves no process behind.
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="needs the triton extra: pip install -e '.[triton]'")
tritonclient_http = pytest.importorskip("tritonclient.http")
import tritonclient.grpc as tritonclient_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402
from triton_helpers import free_port, infer, processes_mentioning, run_threads, serve_ready  # noqa: E402

from trtvae import OrtVae  # noqa: E402
from trtvae.cli import main  # noqa: E402

READY_TIMEOUT_S = 240


def _latents(b, h, w, seed):
    return np.random.default_rng(seed).standard_normal((b, 4, h, w)).astype(np.float16)


@pytest.fixture(scope="module")
def server(tiny_fp16):
    info = serve_ready(tiny_fp16, "--max-batch", "4", "--instances", "2", timeout_s=READY_TIMEOUT_S)
    proc, ports = info["proc"], info["ports"]
    info |= {"http": f"127.0.0.1:{ports[0]}", "grpc": f"127.0.0.1:{ports[1]}"}
    yield info
    if proc.poll() is None:  # a failed test before the SIGINT test
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def ort(tiny_fp16):
    return OrtVae.from_pretrained(tiny_fp16)


def test_banner_names_runtime_endpoints_and_models(server):
    text = server["banner"]
    assert "runtime: OrtVae" in text and "using ONNX Runtime" in text
    for name in ("vae_decoder", "vae_encoder", "vae_decode_image"):
        assert f"model {name}:" in text
    assert server["repo"] and processes_mentioning(server["repo"])


@pytest.mark.parametrize("client", [tritonclient_http, tritonclient_grpc], ids=["http", "grpc"])
def test_decoder_and_encoder_equal_ortvae(server, ort, client):
    url = server["http" if client is tritonclient_http else "grpc"]
    z = _latents(2, 6, 10, seed=1)
    sample = infer(client, url, "vae_decoder", "latent_sample", z, "sample")
    ref = ort.decode(torch.from_numpy(z)).sample.numpy()
    assert sample.dtype == np.float16 and sample.shape == (2, 3, 12, 20)
    np.testing.assert_array_equal(sample, ref)
    x = (np.random.default_rng(2).random((1, 3, 12, 16)) * 2 - 1).astype(np.float16)
    params = infer(client, url, "vae_encoder", "sample", x, "latent_parameters")
    np.testing.assert_array_equal(params, ort.encode(torch.from_numpy(x)).latent_dist.parameters.numpy())


def test_decode_image_is_diffusers_postprocessing_of_unscaled_latents(server, ort):
    from diffusers.image_processor import VaeImageProcessor

    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 6)).astype(np.float32)
    image = infer(tritonclient_grpc, server["grpc"], "vae_decode_image", "latents", latents, "image")
    decoded = ort.decode(torch.from_numpy(latents) / ort.config.scaling_factor).sample
    ref = VaeImageProcessor(vae_scale_factor=2).postprocess(decoded.float(), output_type="np")
    ref = np.round(ref * 255).astype(np.uint8)
    assert image.dtype == np.uint8 and image.shape == (2, 16, 12, 3)
    assert np.abs(image.astype(int) - ref).max() <= 1 and (image == ref).mean() > 0.999


OUTPUTS = {"vae_decoder": "sample", "vae_encoder": "latent_parameters", "vae_decode_image": "image"}
BAD = [
    ("vae_decoder", "latent_sample", np.full((1, 4, 6, 6), np.nan, np.float16), r"144 of 144 values are NaN or inf"),
    ("vae_encoder", "sample", np.zeros((1, 3, 13, 20), np.float16), r"\(1, 3, 13, 20\).*multiples of 2"),
    ("vae_decode_image", "latents", np.full((1, 4, 4, 4), np.inf, np.float32), r"'latents'.*NaN or inf"),
    # Triton itself checks the declared dims: a wrong channel count never reaches the model.
    ("vae_decoder", "latent_sample", np.zeros((1, 3, 6, 6), np.float16), r"unexpected shape.*\[-1,4,-1,-1\]"),
]


@pytest.mark.parametrize("model,name,array,message", BAD, ids=["nan", "odd-size", "inf-latents", "channels"])
def test_bad_requests_get_the_runtimes_message_and_the_server_stays_ready(server, ort, model, name, array, message):
    with pytest.raises(InferenceServerException, match=message) as e:
        infer(tritonclient_http, server["http"], model, name, array, OUTPUTS[model])
    assert str(e.value.status()) == "400"  # the client's input, not a server fault
    client = tritonclient_http.InferenceServerClient(server["http"])
    assert client.is_server_ready() and all(client.is_model_ready(m) for m in
                                            ("vae_decoder", "vae_encoder", "vae_decode_image"))
    client.close()
    z = _latents(1, 4, 4, seed=4)
    np.testing.assert_array_equal(infer(tritonclient_http, server["http"], "vae_decoder", "latent_sample", z, "sample"),
                                  ort.decode(torch.from_numpy(z)).sample.numpy())


def test_eight_clients_get_their_own_answers(server, ort):
    """Same-shaped requests from 8 threads are batched by Triton; each must still get its own image."""
    inputs = {(t, k): _latents(1, 6, 6, seed=100 + 10 * t + k) for t in range(8) for k in range(4)}
    refs = {key: ort.decode(torch.from_numpy(z)).sample.numpy() for key, z in inputs.items()}
    results = {}

    def client(t):
        for k in range(4):
            module = tritonclient_http if (t + k) % 2 else tritonclient_grpc
            url = server["http" if module is tritonclient_http else "grpc"]
            results[(t, k)] = infer(module, url, "vae_decoder", "latent_sample", inputs[(t, k)], "sample")

    assert not run_threads(client, 8)
    assert sorted(results) == sorted(inputs)
    for key, out in results.items():
        np.testing.assert_array_equal(out, refs[key])


def test_bad_request_batched_with_good_ones_fails_alone(server, ort):
    """A NaN request arriving with good ones of the same shape gets its error; the others their answers."""
    good = {t: _latents(1, 6, 6, seed=200 + t) for t in range(5)}
    outcome = {}

    def send(t, z):
        try:
            outcome[t] = infer(tritonclient_grpc, server["grpc"], "vae_decoder", "latent_sample", z, "sample")
        except InferenceServerException as e:
            outcome[t] = e

    bad = _latents(1, 6, 6, seed=299)
    bad[0, 1, 2, 3] = np.nan
    sent = [*good.items(), ("bad", bad)]
    assert not run_threads(lambda i: send(*sent[i]), len(sent), timeout_s=120)
    assert isinstance(outcome["bad"], InferenceServerException) and "NaN or inf" in outcome["bad"].message()
    for t, z in good.items():
        np.testing.assert_array_equal(outcome[t], ort.decode(torch.from_numpy(z)).sample.numpy())


def test_killed_model_worker_gives_errors_never_a_hang_or_a_wrong_answer(server, ort):
    """Kill the decoder's Python backend stubs. Triton 2.51 itself does not restart them: the model stays
    "ready" and its requests fail fast ("Stub process ... is not healthy"). `vae-export serve` notices and
    reloads the model, after which the decoder answers correctly again; the other models never stop."""
    stubs = processes_mentioning(f"{server['repo']}/vae_decoder/")
    assert stubs, "no stub process found for vae_decoder"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    z = _latents(1, 4, 4, seed=5)
    ref = ort.decode(torch.from_numpy(z)).sample.numpy()
    outcomes = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            out = infer(tritonclient_http, server["http"], "vae_decoder", "latent_sample", z, "sample", timeout=60)
        except InferenceServerException as e:
            assert re.search(r"not healthy|stub|unavailable|not found|loading", e.message(), re.IGNORECASE), \
                e.message()
            outcomes.append("error")
        else:
            np.testing.assert_array_equal(out, ref)  # answered: then correctly
            outcomes.append("ok")
            break
        finally:
            assert time.monotonic() - start < 60  # never a hang
        time.sleep(1)
    assert outcomes[-1] == "ok", outcomes
    x = np.zeros((1, 3, 8, 8), np.float16)
    np.testing.assert_array_equal(infer(tritonclient_grpc, server["grpc"], "vae_encoder", "sample", x,
                                        "latent_parameters"),
                                  ort.encode(torch.from_numpy(x)).latent_dist.parameters.numpy())
    assert server["proc"].poll() is None
    said = "".join(server["later"])
    assert "model vae_decoder: a worker process died; reloading the model" in said and "reloaded" in said
    print(f"after killing the decoder's stubs: {outcomes}")


def test_sigint_during_a_reload_stops_the_server_and_leaves_no_process(server):
    """Kill the encoder's stubs, and send SIGINT once serve has begun reloading it (a load takes seconds)."""
    proc, seen = server["proc"], len(server["later"])
    for pid in processes_mentioning(f"{server['repo']}/vae_encoder/"):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("vae_encoder: a worker process died" in ln
                                                  for ln in server["later"][seen:]):
        time.sleep(0.1)
    assert any("vae_encoder: a worker process died; reloading" in ln for ln in server["later"][seen:])
    assert not any("vae_encoder: reloaded" in ln for ln in server["later"][seen:])  # still reloading
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    took = time.monotonic() - sent
    assert took < 30  # Triton's exit timeout (10 s) for in-flight requests, 2 s, then SIGKILL; interpreter exit
    deadline = time.monotonic() + 30
    while processes_mentioning(server["repo"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(server["repo"]) == []
    assert not os.path.exists(server["repo"])  # the temporary repository is removed too
    print(f"SIGINT during a reload: serve exited in {took:.1f} s")


def test_sigterm_stops_a_server_too(tiny_fp32):
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "trtvae.cli", "serve", str(tiny_fp32), "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--prefix", "term"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    repo = None
    try:
        for line in proc.stdout:
            if m := re.search(r"on (\S+/models)$", line.strip()):
                repo = m.group(1)
            if line.startswith("Ctrl-C"):
                break
        assert repo and processes_mentioning(repo)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert processes_mentioning(repo) == []


# --- refused before anything starts ---------------------------------------------------------------
def test_port_in_use_is_one_error_line(tiny_fp16, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(tiny_fp16), "--http-port", str(port), "--grpc-port", str(free_port()),
                     "--metrics-port", str(free_port())]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --http-port {port}: cannot listen on 127.0.0.1:{port}")


def test_folder_without_manifest_is_one_error_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished trtvae export" in err[0]


def test_missing_extra_is_one_error_line(tiny_fp16, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a))
    assert main(["serve", str(tiny_fp16)]) == 1
    assert "pip install 'trtvae[triton]'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the message where TensorRT is missing")
def test_tensorrt_backend_where_it_cannot_run_is_one_error_line(tiny_fp16, capsys):
    assert main(["serve", str(tiny_fp16), "--backend", "tensorrt", "--http-port", str(free_port()),
                 "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --backend tensorrt: TRTVae needs TensorRT")
