"""What a client sees from the Python backend in a real tritonserver: batches and error codes.

The repository is the one `vae-export triton --backend python` writes, with two test changes: the
decoder's dynamic batcher waits up to 5 s to fill a batch (so four requests sent together are
one batch of four, which Triton's own statistics then show), and the encoder's model.py plants a
server fault for requests whose first value is a marker (a real out-of-memory or a manifest error
cannot be produced on demand after a model has loaded).
"""
from __future__ import annotations

import re
import shutil
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="needs the triton extra: pip install -e '.[triton]'")
import tritonclient.grpc as grpc  # noqa: E402
import tritonclient.http as http  # noqa: E402
from triton_helpers import free_port, infer, read_config, write_config  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from trtvae import OrtVae  # noqa: E402
from trtvae.serving.repository import write_triton_repo  # noqa: E402
from trtvae.serving.server import TritonServer  # noqa: E402

QUEUE_DELAY_US = 5_000_000
FAULTY_ENCODER = '''"""trtvae's served encoder with server faults planted for marked requests (tests only)."""
from trtvae.manifest import ManifestError
from trtvae.serving.python_backend import TritonPythonModel as Served


class TritonPythonModel(Served):
    def initialize(self, args):
        super().initialize(args)
        run = self.model.run

        def run_or_fault(array):
            if array.flat[0] == 7:
                raise MemoryError("planted: out of memory in the encoder")
            if array.flat[0] == 9:
                raise ManifestError("planted: encoder.onnx was changed after export")
            return run(array)

        self.model.run = run_or_fault
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_fp16):
    repo = tmp_path_factory.mktemp("batching") / "models"
    write_triton_repo(tiny_fp16, repo, backend="python", instances=1)
    shutil.rmtree(repo / "vae_decode_image")  # not needed here: one server process less to start
    config = read_config(repo / "vae_decoder" / "config.pbtxt")
    config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    write_config(repo / "vae_decoder" / "config.pbtxt", config)
    (repo / "vae_encoder" / "1" / "model.py").write_text(FAULTY_ENCODER)
    triton = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    triton.start()
    try:
        triton.wait_ready(["vae_decoder", "vae_encoder"], timeout_s=400)
        yield triton
    finally:
        triton.stop()


@pytest.fixture(scope="module")
def ort(tiny_fp16):
    return OrtVae.from_pretrained(tiny_fp16)


def _urls(server):
    return {http: f"127.0.0.1:{server.http_port}", grpc: f"127.0.0.1:{server.grpc_port}"}


def test_a_bad_request_in_a_real_batch_fails_alone(server, ort):
    rng = np.random.default_rng(10)
    requests = [rng.standard_normal((1, 4, 6, 6)).astype(np.float16) for _ in range(4)]
    requests[2][0, 1, 2, 3] = np.nan
    outcome, barrier = {}, threading.Barrier(len(requests))

    def send(i):
        barrier.wait()
        try:
            outcome[i] = infer(grpc, _urls(server)[grpc], "vae_decoder", "latent_sample", requests[i], "sample")
        except InferenceServerException as e:
            outcome[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # Triton's own record: the model executed once, on a batch of 4 (requests of batch 1 each).
    client = http.InferenceServerClient(_urls(server)[http])
    stats = client.get_inference_statistics("vae_decoder")["model_stats"][0]
    client.close()
    executed = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert executed == {4: 1}, stats
    # What the model saw: one line saying the batch of 4 failed and why, then each request alone.
    said = [ln for ln in server.log_tail(400).splitlines() if "vae_decoder: a batch of" in ln]
    assert len(said) == 1 and re.search(r"a batch of 4 requests \(4 images, \[4, 6, 6\]\) failed \(ValueError: .*"
                                        r"1 of 576 values are NaN or inf.*running each request alone", said[0]), said
    bad = outcome[2]
    assert isinstance(bad, InferenceServerException) and bad.status() == "StatusCode.INVALID_ARGUMENT", bad
    assert "NaN or inf" in bad.message()
    for i in (0, 1, 3):
        np.testing.assert_array_equal(outcome[i], ort.decode(torch.from_numpy(requests[i])).sample.numpy())


@pytest.mark.parametrize("client", [http, grpc], ids=["http", "grpc"])
def test_a_server_fault_is_internal_and_a_bad_tensor_invalid_arg(server, ort, client):
    expected = {http: ("500", "400"), grpc: ("StatusCode.INTERNAL", "StatusCode.INVALID_ARGUMENT")}[client]
    url = _urls(server)[client]
    for marker, message in ((7, "MemoryError: planted: out of memory"),
                            (9, "ManifestError: planted: encoder.onnx was changed")):  # a ValueError, yet the server's
        x = np.zeros((1, 3, 8, 8), np.float16)
        x.flat[0] = marker
        with pytest.raises(InferenceServerException) as e:
            infer(client, url, "vae_encoder", "sample", x, "latent_parameters")
        assert e.value.status() == expected[0] and message in e.value.message(), e.value
    with pytest.raises(InferenceServerException) as e:
        infer(client, url, "vae_encoder", "sample", np.zeros((1, 3, 13, 8), np.float16), "latent_parameters")
    assert e.value.status() == expected[1] and "multiples of 2" in e.value.message(), e.value
    x = np.full((1, 3, 8, 8), 0.25, np.float16)  # and the model still answers, correctly
    np.testing.assert_array_equal(infer(client, url, "vae_encoder", "sample", x, "latent_parameters"),
                                  ort.encode(torch.from_numpy(x)).latent_dist.parameters.numpy())
