"""Shared by the serving tests: processes of a server, and requests through tritonclient."""
from __future__ import annotations

import numpy as np


def processes_mentioning(text: str) -> list:
    """PIDs of live processes whose command line contains `text` (the server and its stubs name their repository)."""
    from trtvae.serving.server import processes_with

    return [pid for pid, status in processes_with(text) if status.get("State", "")[:1] != "Z"]


def infer(client_module, url: str, model: str, name: str, array: np.ndarray, output: str, timeout: float = 60.0):
    """One request over HTTP or gRPC with binary tensors; returns the output array."""
    types = {np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32"}
    inp = client_module.InferInput(name, list(array.shape), types[array.dtype])
    if client_module.__name__.endswith("http"):
        client = client_module.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)
        inp.set_data_from_numpy(array, binary_data=True)
        result = client.infer(model, [inp], outputs=[client_module.InferRequestedOutput(output, binary_data=True)])
    else:
        client = client_module.InferenceServerClient(url)
        inp.set_data_from_numpy(array)
        result = client.infer(model, [inp], client_timeout=timeout)
    try:
        return result.as_numpy(output)
    finally:
        client.close()
