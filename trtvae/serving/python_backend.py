"""The served models as Triton's Python backend: `TritonPythonModel`, imported by each model's `1/model.py`.

The model's config.pbtxt parameters say which model it is (`trtvae_model`), where the export is
(`export_dir`, default `1/export` inside the model folder) and which runtime to use (`runtime`:
auto, tensorrt or onnxruntime). Requests of one shape that Triton batched together run as one
runtime call; if that call fails, each request is run alone, so a bad request gets its own error
and never takes its neighbours' answers down with it.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from .models import ServedModel, model_decls

logger = logging.getLogger("trtvae.serving")


def _parameters(model_config: dict) -> dict:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        params = _parameters(config)
        export_dir = params.get("export_dir") or os.path.join(args["model_repository"], args["model_version"], "export")
        from ..manifest import read_manifest
        from ..swap import load_runtime

        manifest = read_manifest(export_dir)
        kind = params.get("trtvae_model")
        decls = {d.kind: d for d in model_decls(manifest, params.get("prefix", "vae"))}
        if kind not in decls:
            raise ValueError(f"model {args['model_name']!r}: parameter trtvae_model={kind!r}, expected one of "
                             f"{sorted(decls)} for the export in {export_dir}")
        runtime, reason = load_runtime(export_dir, params.get("runtime", "auto"))
        self.model = ServedModel(decls[kind], runtime)
        message = f"trtvae: {args['model_name']} runs {type(runtime).__name__} on {runtime.device} ({reason})"
        pb_utils.Logger.log_info(message) if hasattr(pb_utils, "Logger") else logger.info(message)

    def execute(self, requests):
        decl = self.model.decl
        arrays = [self._pb.get_input_tensor_by_name(r, decl.input.name).as_numpy() for r in requests]
        results = self._run_grouped(arrays)
        responses = []
        for result in results:
            if isinstance(result, Exception):
                responses.append(self._pb.InferenceResponse(output_tensors=[], error=self._error(result)))
            else:
                responses.append(self._pb.InferenceResponse(output_tensors=[self._pb.Tensor(decl.output.name, result)]))
        return responses

    def _error(self, e: Exception):
        error = self._pb.TritonError
        text = f"{type(e).__name__}: {e}"
        # The runtime raises ValueError for input it refuses: the client's to fix (HTTP 400), not the server's.
        if isinstance(e, ValueError) and hasattr(error, "INVALID_ARG"):
            return error(text, error.INVALID_ARG)
        return error(text)

    def _run_grouped(self, arrays: list) -> list:
        """One runtime call per group of same-shaped requests; a failed group is retried request by request."""
        results: list = [None] * len(arrays)
        groups: dict = {}
        for i, a in enumerate(arrays):
            groups.setdefault((a.shape[1:], a.dtype.str), []).append(i)
        for members in groups.values():
            if len(members) > 1:
                try:
                    out = self.model.run(np.concatenate([arrays[i] for i in members]))
                except Exception:  # noqa: BLE001 - find which request it was, below
                    pass
                else:
                    starts = np.cumsum([0] + [arrays[i].shape[0] for i in members])
                    for i, a, b in zip(members, starts[:-1], starts[1:]):
                        results[i] = out[a:b]
                    continue
            for i in members:
                try:
                    results[i] = self.model.run(arrays[i])
                except Exception as e:  # noqa: BLE001 - becomes this request's error response
                    results[i] = e
        return results

    def finalize(self):
        self.model = None
