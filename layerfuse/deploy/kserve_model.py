"""A ``kserve.Model`` that serves one ONNX graph through layerfuse's onnxruntime session.

KServe's ``ModelServer`` answers the v2 protocol (REST and gRPC) for it: metadata comes from
the graph's signature, inference runs in :func:`layerfuse.runtime.session.create_session`'s
session with pre-packing on. Requests are checked against the signature before they reach
onnxruntime, so a wrong name, datatype, rank or size, an empty or oversized shape, data that
does not fill its shape or has the wrong JSON kind (a float for INT64 would be truncated), and
inputs that disagree on a dimension the graph names alike (onnxruntime would broadcast them) are
a 400 / INVALID_ARGUMENT naming the tensor, not a 200, a 500 or an onnxruntime traceback.
"""

from __future__ import annotations

__all__ = ["OnnxModel"]

import asyncio
from pathlib import Path

import kserve
import numpy as np
import onnx_ir as ir
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from layerfuse.deploy.signature import Signature, TensorSpec, graph_signature
from layerfuse.deploy.tensor_checks import (
    RequestError,
    check_binary_size,
    check_json_data,
    check_shape,
    check_shared_dims,
)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OnnxModel(kserve.Model):
    """One graph; ``load()`` builds the session, ``error`` says why it could not."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        provider: str = "cpu",
        threads: int = 0,
        max_input_elements: int = 0,
    ) -> None:
        super().__init__(name)
        self.path = Path(path)
        self.provider, self.threads, self.max_input_elements = provider, threads, max_input_elements
        self.signature: Signature | None = None
        self.session = None
        self.symbols: dict[str, list] = {}
        self.error: str | None = None

    def load(self) -> bool:
        from layerfuse.runtime.session import create_session

        self.signature = graph_signature(ir.load(self.path))
        self.session = create_session(
            self.path, provider=self.provider, threads=self.threads or None, prepacking=True
        )
        # onnxruntime names symbolic dimensions ("batch", "sequence"); fixed ones are ints.
        self.symbols = {value.name: list(value.shape) for value in self.session.get_inputs()}
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [spec.to_json() for spec in self.signature.inputs] if self.signature else []

    def get_output_types(self) -> list[dict]:
        return [spec.to_json() for spec in self.signature.outputs] if self.signature else []

    def _array(self, spec: TensorSpec, tensor) -> np.ndarray:
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{spec.name}' has datatype {tensor.datatype}, the model expects "
                f"{spec.datatype}"
            )
        try:
            shape = list(tensor.shape)
            count = check_shape(spec.name, shape, self.max_input_elements)
            if len(shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
            ):
                raise RequestError(
                    f"input '{spec.name}' has shape {shape}, the model expects {list(spec.shape)}"
                )
            if tensor._raw_data is not None:  # binary data (REST extension) or raw gRPC contents
                check_binary_size(spec.name, spec.datatype, len(tensor._raw_data), count)
            elif isinstance(tensor.data, list):
                check_json_data(spec.name, spec.datatype, tensor.data, count)
        except (RequestError, TypeError, ValueError) as exc:
            raise InvalidInput(_first_line(exc)) from None
        try:
            array = tensor.as_numpy()
        except Exception as exc:
            raise InvalidInput(f"input '{spec.name}': {_first_line(exc)}") from None
        if list(array.shape) != shape:
            raise InvalidInput(f"input '{spec.name}': its data does not fill shape {shape}")
        return array

    def _feed(self, payload: InferRequest) -> dict[str, np.ndarray]:
        given = {tensor.name: tensor for tensor in payload.inputs}
        feed = {}
        for spec in self.signature.inputs:
            if spec.name not in given:
                raise InvalidInput(f"input '{spec.name}' is missing")
            feed[spec.name] = self._array(spec, given.pop(spec.name))
        if given:
            raise InvalidInput(f"unexpected inputs {sorted(given)}")
        try:
            check_shared_dims({name: array.shape for name, array in feed.items()}, self.symbols)
        except RequestError as exc:
            raise InvalidInput(str(exc)) from None
        return feed

    async def predict(self, payload, headers=None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("only the v2 inference protocol is served")
        feed = self._feed(payload)
        names = [spec.name for spec in self.signature.outputs]
        try:
            # In a worker thread: a synchronous predict would run on the event loop and hold
            # up health checks, gRPC and shutdown for the whole inference.
            arrays = await asyncio.to_thread(self.session.run, names, feed)
        except InvalidArgument as exc:
            raise InvalidInput(f"onnxruntime: {_first_line(exc)}") from None
        except Exception as exc:
            raise InferenceError(f"onnxruntime: {_first_line(exc)}") from None
        wanted = {out.name for out in payload.request_outputs or []} or set(names)
        outputs = []
        for spec, array in zip(self.signature.outputs, arrays, strict=True):
            if spec.name not in wanted:
                continue
            # Raw bytes, not data=array: kserve 0.21's to_grpc() tests `if output.data` on the
            # array and fails every gRPC response that carries numpy data.
            output = InferOutput(spec.name, list(array.shape), spec.datatype)
            output.set_data_from_numpy(np.ascontiguousarray(array), binary_data=True)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )
