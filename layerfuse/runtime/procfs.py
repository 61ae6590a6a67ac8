"""Fields of Linux ``/proc`` files, for the memory figures measure and widening read.

Apart from :mod:`layerfuse.runtime.measure` so that session building (which asks how much
memory is available) does not import the measuring code, which imports sessions.
"""

from __future__ import annotations

__all__ = ["proc_bytes"]


def proc_bytes(path: str, key: str) -> int | None:
    """The ``key: N kB`` field of a Linux ``/proc`` file in bytes; None where there is none."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
