"""Triton Python-backend model that runs ``model.onnx`` (beside this file) in onnxruntime.

Written by ``layerfuse deploy triton --backend python``. Self-contained on purpose: it imports
only numpy and onnxruntime, because the Python stub runs in its own interpreter, where
layerfuse is usually not installed (production Triton images, the stub that ``layerfuse serve``
starts). It follows layerfuse's session policy: pre-packing on (onnxruntime >= 1.21 keeps one
packed copy of a tied weight) and ``malloc_trim(0)`` after the session is built.

Where numpy and onnxruntime come from: the stub embeds an isolated interpreter (PYTHONPATH is
ignored), so either the config sets ``EXECUTION_ENV_PATH`` to an environment holding them, or
the server's environment names folders in ``LAYERFUSE_TRITON_SITE`` (``layerfuse serve`` does),
which are put on ``sys.path`` here, at import time: the stub imports this module before its
own helpers, which import numpy. numpy must be < 2: the stub's binary reads numpy 1's array
layout, and under numpy 2 tensors arrive with wrong contents and leave empty.

What ``execute`` cannot refuse: the stub's C++ side builds each input's numpy array before
``execute`` runs, so a declared shape numpy cannot hold (Triton 2.51 lets ``[8, 2^61]`` with
no data through, its byte count wrapping to 0) kills the stub first. ``layerfuse serve``
refuses such requests in its front; a Triton of your own needs the same check before it.
"""

import contextlib
import ctypes
import json
import os
import sys

for _folder in reversed(os.environ.get("LAYERFUSE_TRITON_SITE", "").split(os.pathsep)):
    if _folder and _folder not in sys.path:
        sys.path.insert(0, _folder)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument  # noqa: E402


class InputError(ValueError):
    """A request the model cannot take (answered with INVALID_ARG, i.e. HTTP 400)."""


def _parameter(config, key, default):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _release_freed_heap():
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class TritonPythonModel:
    def initialize(self, args):
        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(
                f"the Triton Python stub needs numpy<2 (found {np.__version__} at "
                f"{np.__file__}): tensors would be corrupted"
            )
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = int(_parameter(config, "intra_op_thread_count", "0"))
        options.inter_op_num_threads = int(_parameter(config, "inter_op_thread_count", "0"))
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            device = {"device_id": int(args.get("model_instance_device_id", 0))}
            providers.insert(0, ("CUDAExecutionProvider", device))
        self.session = ort.InferenceSession(path, options, providers=providers)
        _release_freed_heap()
        self.batching = config.get("max_batch_size", 0) > 0
        self.max_elements = int(_parameter(config, "max_input_elements", "0"))
        self.inputs = [
            (item["name"], pb_utils.triton_string_to_numpy(item["data_type"]))
            for item in config["input"]
        ]
        self.outputs = [item.name for item in self.session.get_outputs()]
        # onnxruntime names symbolic dimensions ("batch", "sequence"); fixed ones are ints.
        self.symbols = {item.name: item.shape for item in self.session.get_inputs()}
        pb_utils.Logger.log_info(
            f"layerfuse: {path} on {self.session.get_providers()[0]} (onnxruntime "
            f"{ort.__version__}, numpy {np.__version__}, batching {self.batching})"
        )

    def _feed(self, request):
        feed = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise InputError(f"input '{name}' is missing")
            array = tensor.as_numpy()
            if 0 in array.shape:
                raise InputError(
                    f"input '{name}' has shape {list(array.shape)}: every dimension must be "
                    f"at least 1"
                )
            if self.max_elements and array.size > self.max_elements:
                raise InputError(
                    f"input '{name}' has {array.size} elements, the limit is {self.max_elements}"
                )
            feed[name] = array.astype(dtype, copy=False)
        self._check_shared_dims(feed)
        return feed

    def _check_shared_dims(self, feed):
        """Inputs whose graph names a dimension alike must agree on it: onnxruntime would
        broadcast a [1, 8] mask against [2, 8] ids and answer."""
        seen = {}
        for name, array in feed.items():
            for symbol, size in zip(self.symbols.get(name, ()), array.shape, strict=False):
                if isinstance(symbol, str) and symbol:
                    first = seen.setdefault(symbol, (name, size))
                    if first[1] != size:
                        raise InputError(
                            f"input '{name}' has {symbol} = {size}, input '{first[0]}' has "
                            f"{first[1]}"
                        )

    def _respond(self, request, outputs):
        wanted = set(request.requested_output_names()) or set(self.outputs)
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value))
            for name, value in zip(self.outputs, outputs, strict=True)
            if name in wanted
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(exc):
        invalid = isinstance(exc, InputError | InvalidArgument)
        code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(message, code)
        )

    def _run_one(self, request, feed):
        try:
            return self._respond(request, self.session.run(self.outputs, feed))
        except Exception as exc:  # one bad request must not fail the others or the model
            return self._error(exc)

    def _run_stacked(self, group, responses):
        """Requests whose inputs agree beyond the batch dimension run as one batch; if that
        run fails, each runs alone so that one bad request does not fail its neighbours."""
        sizes = [feed[self.inputs[0][0]].shape[0] for _, _, feed in group]
        stacked = {name: np.concatenate([f[name] for _, _, f in group]) for name, _ in self.inputs}
        try:
            outputs = self.session.run(self.outputs, stacked)
        except Exception:
            for index, request, feed in group:
                responses[index] = self._run_one(request, feed)
            return
        bounds = np.cumsum(sizes)[:-1]
        parts = [np.split(output, bounds) for output in outputs]
        for position, (index, request, _) in enumerate(group):
            responses[index] = self._respond(request, [part[position] for part in parts])

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            try:
                feed = self._feed(request)
            except Exception as exc:
                responses[index] = self._error(exc)
                continue
            key = (
                tuple((a.shape[1:], a.dtype.str) for a in feed.values()) if self.batching else index
            )
            groups.setdefault(key, []).append((index, request, feed))
        for group in groups.values():
            if len(group) == 1:
                index, request, feed = group[0]
                responses[index] = self._run_one(request, feed)
            else:
                self._run_stacked(group, responses)
        return responses

    def finalize(self):
        self.session = None
