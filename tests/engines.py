"""Which serving engines can start on this machine; tests of the others are skipped."""

from __future__ import annotations

import importlib.util

import pytest

from layerfuse.errors import LayerfuseError


def require_engine(engine: str) -> None:
    """Skip the calling test unless ``engine`` can start here."""
    if engine == "kserve":
        # Looked up, not imported: kserve's v2 protos clash with tritonclient's in one process.
        if importlib.util.find_spec("kserve") is None:
            pytest.skip("kserve is not installed (the serve extra)")
        return
    from layerfuse.deploy.triton_server import find_triton

    try:
        find_triton()
    except LayerfuseError as exc:
        pytest.skip(f"the bundled tritonserver cannot start here: {exc}")
