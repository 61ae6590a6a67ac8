"""Run onnx_ir passes so that user-facing errors stay user-facing.

onnx_ir wraps anything raised in a pass's ``requires``/``ensures`` in a Pre/PostconditionError.
A :class:`LayerfuseError` there (a plan that does not fit, FFs of different shapes) is the
user's to fix, so it is re-raised as itself and the CLI prints it as one line.
"""

from __future__ import annotations

__all__ = ["run_pass"]

import onnx_ir as ir

from layerfuse.errors import LayerfuseError


def run_pass(pass_: ir.passes.PassBase, model: ir.Model) -> ir.passes.PassResult:
    try:
        return pass_(model)
    except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
        if isinstance(exc.__cause__, LayerfuseError):
            raise exc.__cause__ from None
        raise
