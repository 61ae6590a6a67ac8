"""Errors that are the user's to fix.

The CLI prints a :class:`LayerfuseError` as one line and exits non-zero; anything else is a
bug and keeps its traceback. Raising this type is therefore a promise that the message alone
tells the user what went wrong and where.
"""

from __future__ import annotations


class LayerfuseError(Exception):
    """A problem with the input, the environment or a plan, reported without a traceback."""


class InvalidModelError(LayerfuseError):
    """The file is not a loadable ONNX model (corrupt, truncated, missing external data)."""


class DetectionError(LayerfuseError):
    """The graph has no transformer structure that layerfuse can work on.

    ``rejections`` lists why each candidate sublayer was turned down, for ``inspect --explain``.
    """

    def __init__(self, message: str, rejections: tuple = ()) -> None:
        super().__init__(message)
        self.rejections = tuple(rejections)


class PlanError(LayerfuseError):
    """A plan does not fit the model it is applied to, or asks for something impossible."""


class DataError(LayerfuseError):
    """Calibration or evaluation data is missing or does not match the model."""
