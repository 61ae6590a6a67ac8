"""Training state on disk, written so that an interruption never leaves half of it.

``state.pt`` holds everything a resumed run needs to continue bit for bit: the parameters by
initializer name, the optimizer and scheduler states, the random generators, the step (which
alone fixes the data position, see :mod:`layerfuse.recover.data`), the validation history
and the early-stopping record, and the settings it was made with (a resume with other
settings is refused). ``best.pt`` holds the parameters of the best validation score.
"""

from __future__ import annotations

__all__ = ["load_state", "restore_random", "save_state", "snapshot_random"]

import os
import random
from pathlib import Path

import numpy as np
import torch

from layerfuse.errors import LayerfuseError


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, required: tuple[str, ...] = ("params",)) -> dict:
    """The state in ``path``, refused in one line if unreadable or lacking ``required`` keys."""
    if not path.is_file():
        raise LayerfuseError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt pickle raises anything from EOFError to UnpicklingError
        raise LayerfuseError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise LayerfuseError(
            f"{path}: not a complete layerfuse checkpoint (missing {', '.join(missing)})"
        )
    return state


def snapshot_random() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_random(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
