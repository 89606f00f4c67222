"""The served models as Triton's Python backend: `TritonPythonModel`, imported by each model's `1/model.py`.

The model's config.pbtxt parameters say which model it is (`trtvae_model`), where the export is
(`export_dir`, default `1/export` inside the model folder), which runtime to use (`runtime`:
auto, tensorrt or onnxruntime) and above which size to tile exactly (`tile`: image pixels a side,
"auto" for the model's own sample_size, 0 for never; see models.py).

Invariants:
- `initialize` loads the runtime and runs one warm-up inference, so a model Triton calls ready is
  loaded; a file that fails its manifest check (or any load error) fails the load, naming the file.
- A request the runtime refuses (a plain `ValueError`: shape, NaN/inf) is answered `INVALID_ARG`;
  anything else (a `TrtvaeError` such as a manifest or engine error, out of memory, a bug) is
  `INTERNAL` with its message.
- Requests of one shape that Triton batched together run as one runtime call; if that call fails,
  one log line says why and each request is run alone, so a bad request gets its own error and never
  takes its neighbours' answers down with it.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from ..errors import TrtvaeError, first_line
from .models import ServedModel, check_tile, model_decls, parse_tile

logger = logging.getLogger("trtvae.serving")


def _parameters(model_config: dict) -> dict:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def is_client_error(e: BaseException) -> bool:
    """The runtime refuses input with a plain ValueError; ManifestError is a ValueError too, but the server's."""
    return isinstance(e, ValueError) and not isinstance(e, TrtvaeError)


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # provided by the Python backend's stub

        self._pb = pb_utils
        self.name = args["model_name"]
        config = json.loads(args["model_config"])
        params = _parameters(config)
        export_dir = params.get("export_dir") or os.path.join(args["model_repository"], args["model_version"], "export")
        from ..manifest import read_manifest
        from ..swap import load_runtime

        try:
            manifest = read_manifest(export_dir)
            kind = params.get("trtvae_model")
            decls = {d.kind: d for d in model_decls(manifest, params.get("prefix", "vae"))}
            if kind not in decls:
                raise ValueError(f"parameter trtvae_model={kind!r}, expected one of {sorted(decls)} for the export "
                                 f"in {export_dir}")
            tile = parse_tile(params.get("tile", "auto"))
            check_tile(tile, manifest["vae_config"], "parameter tile")
            runtime, reason = load_runtime(export_dir, params.get("runtime", "auto"))
            self.model = ServedModel(decls[kind], runtime, tile)
            shape = self.model.warm_up()
        except Exception as e:  # noqa: BLE001 - Triton shows this one line as the model's load error
            raise RuntimeError(f"model {self.name} cannot load: {type(e).__name__}: {first_line(e)}") from None
        self._log(f"trtvae: {self.name} runs {type(runtime).__name__} on {runtime.device} ({reason}); "
                  f"warm-up inference {list(shape)} done; tiling: {self.model.tiling}")

    def _log(self, message: str, warn: bool = False) -> None:
        log = getattr(self._pb, "Logger", None)
        if log is None:
            (logger.warning if warn else logger.info)(message)
        else:
            (log.log_warn if warn else log.log_info)(message)

    def execute(self, requests):
        decl = self.model.decl
        arrays = [self._pb.get_input_tensor_by_name(r, decl.input.name).as_numpy() for r in requests]
        results = self._run_grouped(arrays)
        responses = []
        for result in results:
            if isinstance(result, BaseException):
                responses.append(self._pb.InferenceResponse(output_tensors=[], error=self._error(result)))
            else:
                responses.append(self._pb.InferenceResponse(output_tensors=[self._pb.Tensor(decl.output.name, result)]))
        return responses

    def _error(self, e: BaseException):
        error = self._pb.TritonError
        text = f"{type(e).__name__}: {e}"
        return error(text, error.INVALID_ARG if is_client_error(e) else error.INTERNAL)

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
                except Exception as e:  # noqa: BLE001 - find which request it was, below
                    images = sum(arrays[i].shape[0] for i in members)
                    self._log(f"trtvae: {self.name}: a batch of {len(members)} requests ({images} images, "
                              f"{list(arrays[members[0]].shape[1:])}) failed ({type(e).__name__}: {first_line(e)}); "
                              "running each request alone", warn=True)
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
