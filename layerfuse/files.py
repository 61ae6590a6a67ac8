"""Write result files so that a reader never sees half of one, and never write over an input.

Every file layerfuse writes outside a model folder (plans, manifests, reports, benchmark
results) goes through here: the text lands in a temporary file beside the target and is moved
into place with one atomic rename, so an interrupted run leaves the previous file intact.

Bigger outputs (models, deployment folders) are built in a staging folder beside their target
(:func:`staging_dir`). Its name carries the writer's process id, so the next writer into the
same folder can tell a folder left by a killed run (its process is gone) from one that a
concurrent run is still filling, and removes only the former.
"""

from __future__ import annotations

__all__ = [
    "STAGING_PREFIX",
    "check_writable",
    "process_alive",
    "refuse_overwriting_inputs",
    "remove_stale_staging",
    "staging_dir",
    "write_json_atomic",
    "write_text_atomic",
]

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from layerfuse.errors import LayerfuseError

STAGING_PREFIX = ".layerfuse-"


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain exclusive open (not mkstemp, which makes the file 0600) keeps the umask's mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts: it may not be touched)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(folder: str | os.PathLike, prefix: str = STAGING_PREFIX) -> list[Path]:
    """Remove folders named ``PREFIX[KIND-]PID-...`` in ``folder`` whose process is gone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    pattern = re.compile(rf"^{re.escape(prefix)}[a-z-]*?-?(\d+)-[^/]+$")
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staging_dir(folder: str | os.PathLike, kind: str = "save") -> Iterator[Path]:
    """A fresh staging folder inside ``folder`` (same filesystem, so renames are atomic).

    It is removed on every exit, and folders that killed runs left behind are removed first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder)
    path = Path(tempfile.mkdtemp(dir=folder, prefix=f"{STAGING_PREFIX}{kind}-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def refuse_overwriting_inputs(
    inputs: Iterable[str | os.PathLike], outputs: Iterable[str | os.PathLike | None]
) -> None:
    """Raise if any output path is a file that an input is, or reads (compared resolved).

    ``inputs`` should list every file a command reads, external data included
    (:func:`layerfuse.model.io.model_files`), since writing over a weights file that the
    source graph points to destroys the source as surely as writing over the graph.
    """
    read = {Path(path).resolve(): Path(path) for path in inputs}
    for output in outputs:
        if output is None:
            continue
        resolved = Path(output).resolve()
        if resolved in read:
            raise LayerfuseError(
                f"output {output} is {read[resolved]}, which this command reads; "
                f"write to another path"
            )


def check_writable(path: str | os.PathLike) -> Path:
    """Raise unless ``path`` could be created, without creating it or any folder above it.

    Checked up front so that a mistake costs seconds; creating the folders here would leave
    an empty output folder behind every run that fails later.
    """
    path = Path(path)
    if path.is_dir():
        raise LayerfuseError(f"output {path} is a folder; name a file")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LayerfuseError(f"cannot write {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LayerfuseError(f"cannot write {path}: {ancestor} is not writable")
    return path
