"""Keep onnxruntime's tools from talking to the user while they convert a model.

``MatMulNBitsQuantizer`` logs one INFO line per node it visits (2,152 for a 270M model), and
importing its module calls ``logging.basicConfig(level=INFO)``, which puts a handler on the
root logger for the rest of the process; ``quantize_dynamic`` warns through the root logger
itself ("Please consider to run pre-processing", advice layerfuse has already weighed). None
of that tells a layerfuse user anything: the conversion either succeeds, and layerfuse says
what it wrote, or raises, and layerfuse says why in one line. So while a tool runs its
loggers pass only errors, and whatever it did to the root logger is undone afterwards.
layerfuse's own progress goes through its reporter, not through ``logging``, and is untouched.
"""

from __future__ import annotations

__all__ = ["quiet_onnxruntime"]

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Loggers of onnxruntime's Python tools: its package (``onnxruntime.quantization.*``,
# ``onnxruntime.transformers.*`` log under their module names) and the weight-only
# quantizers it vendors, which log as "neural_compressor".
_TOOL_LOGGERS = ("onnxruntime", "neural_compressor")


class _FromOnnxruntime(logging.Filter):
    """Drops records below ERROR that onnxruntime's code logged on the root logger."""

    def __init__(self, package: Path) -> None:
        super().__init__()
        self.package = str(package)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.package)


@contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Only errors from onnxruntime's Python tools inside the block; root logger restored."""
    import onnxruntime

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = [logging.getLogger(name) for name in _TOOL_LOGGERS]
    levels = [logger.level for logger in loggers]
    only_errors = _FromOnnxruntime(Path(onnxruntime.__file__).parent)
    root.addFilter(only_errors)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.setLevel(previous)
        root.removeFilter(only_errors)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
