"""Debian packages as offline data: downloaded and unpacked into layerfuse's cache.

No dataset hub is reachable, but Debian's package archive is: text that packages ship
(fortunes, GCIDE, the Python documentation) is fetched with ``apt-get download`` and unpacked
with ``dpkg-deb -x`` into ``$LAYERFUSE_CACHE`` (default ``~/.cache/layerfuse``), so neither
root nor a system install is needed. Unpacking goes to a staging folder renamed into place,
so an interrupted download never leaves a half-unpacked cache that a later run would trust.
"""

from __future__ import annotations

__all__ = ["cache_root", "unpacked_package"]

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from layerfuse.errors import DataError


def cache_root() -> Path:
    return Path(os.environ.get("LAYERFUSE_CACHE") or Path.home() / ".cache" / "layerfuse")


def _download(packages: tuple[str, ...], target: Path, purpose: str) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError(
            f"{purpose} is missing and apt-get/dpkg-deb are not available; "
            f"install Debian's {', '.join(packages)} package(s)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run(
            ["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True, check=False
        )
        if download.returncode != 0:
            reason = (download.stderr.strip() or "apt-get failed").splitlines()[-1]
            raise DataError(
                f"could not download Debian's {', '.join(packages)} ({reason}); "
                f"run 'apt-get update' or install the package(s)"
            )
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        os.replace(staging, target)


def unpacked_package(name: str, packages: tuple[str, ...], marker: str, purpose: str) -> Path:
    """The cache folder ``name`` holding ``packages`` unpacked; ``marker`` (a path inside it)
    tells a complete unpacking from a stale or foreign folder, which is replaced."""
    folder = cache_root() / name
    if not (folder / marker).exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        _download(packages, folder, purpose)
        if not (folder / marker).exists():
            raise DataError(f"Debian's {', '.join(packages)} did not contain {marker}")
    return folder
