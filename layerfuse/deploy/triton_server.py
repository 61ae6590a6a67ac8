"""Run the ``tritonserver`` binary that PyPI's ``nvidia-pytriton`` wheel ships (Triton 2.51).

The wheel holds the server, its Python backend and Python-backend stubs, but no onnxruntime
backend: the bundled server runs repositories written with ``--backend python``. Three things
make its stub work on a plain machine, and each is checked here with a one-line fix:

- the stub embeds Debian's ``libpython3.11.so.1.0`` (``apt-get install libpython3.11``);
- the stub's interpreter needs numpy < 2 and onnxruntime; they live in a ``pip --target``
  folder (the *stub site*, ``<venv>/triton-stub`` by default, made by scripts/setup.sh) that
  ``model.py`` puts on ``sys.path`` from ``LAYERFUSE_TRITON_SITE``;
- the backend folder handed to the server holds *symlinks* into the wheel: the stub finds its
  bundled libraries through ``$ORIGIN`` relative paths, which a copy would break.
"""

from __future__ import annotations

__all__ = [
    "STUB_PYTHON",
    "TritonInstall",
    "default_stub_site",
    "find_triton",
    "stub_setup_command",
    "triton_command",
]

import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from layerfuse.errors import LayerfuseError

STUB_PYTHON = "3.11"
_PYTRITON = "nvidia-pytriton==0.7.0"


def default_stub_site() -> Path:
    """``$LAYERFUSE_TRITON_STUB`` or ``<this environment>/triton-stub``."""
    return Path(os.environ.get("LAYERFUSE_TRITON_STUB", Path(sys.prefix) / "triton-stub"))


def stub_setup_command(site: Path) -> str:
    version = importlib.metadata.version("onnxruntime")
    return (
        f"python -m pip install --target {site} --python-version {STUB_PYTHON} "
        f"--only-binary=:all: 'numpy<2' onnxruntime=={version}"
    )


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path
    stub: Path
    stub_site: Path

    def backend_directory(self, folder: Path) -> Path:
        """A ``--backend-directory`` whose ``python/`` entries link into the wheel."""
        python = folder / "python"
        python.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": self.python_backend / "libtriton_python.so",
            "triton_python_backend_utils.py": (
                self.python_backend / "triton_python_backend_utils.py"
            ),
            "triton_python_backend_stub": self.stub,
        }
        for name, target in links.items():
            (python / name).symlink_to(target)
        return folder


def _stub_site_problem(site: Path) -> str | None:
    numpy = sorted(site.glob("numpy-*.dist-info"))
    if not numpy or not (site / "onnxruntime").is_dir():
        return f"no numpy<2 + onnxruntime for the Triton Python stub in {site}"
    if not numpy[-1].name.removeprefix("numpy-").startswith("1."):
        return f"the Triton Python stub needs numpy<2, {site} has {numpy[-1].name}"
    return None


def find_triton(stub_site: Path | None = None) -> TritonInstall:
    """The bundled server and a working stub setup, or a LayerfuseError saying what to do."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise LayerfuseError(
            f"the triton engine needs the tritonserver binary from PyPI's {_PYTRITON}: "
            f"pip install --no-deps {_PYTRITON} (scripts/setup.sh does this)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub",
        stub_site=Path(stub_site) if stub_site else default_stub_site(),
    )
    missing = [p for p in (install.binary, install.stub) if not p.is_file()]
    if missing:
        raise LayerfuseError(
            f"{missing[0]} is missing: reinstall with pip install --no-deps --force-reinstall "
            f"{_PYTRITON}"
        )
    if ctypes.util.find_library(f"python{STUB_PYTHON}") is None:
        raise LayerfuseError(
            f"the Triton Python stub needs Debian's libpython{STUB_PYTHON}: "
            f"apt-get install libpython{STUB_PYTHON}"
        )
    problem = _stub_site_problem(install.stub_site)
    if problem:
        raise LayerfuseError(
            f"{problem}: create it with {stub_setup_command(install.stub_site)} "
            f"(scripts/setup.sh does this), or pass --stub-site"
        )
    return install


def triton_command(
    install: TritonInstall,
    repositories: list[Path],
    backend_dir: Path,
    *,
    host: str,
    http_port: int,
    grpc_port: int,
    grace_seconds: int,
) -> tuple[list[str], dict[str, str]]:
    """The server's command line and the environment additions its stubs need.

    Readiness is not strict and a failed model does not stop the server: ``layerfuse serve``
    reads the repository index after start-up and reports (or refuses) failed models itself,
    with the reason Triton gives. Model control is explicit (every model loaded at start) so
    that a model whose Python stub died can be reloaded.
    """
    command = [str(install.binary)]
    for repo in repositories:
        command += ["--model-repository", str(repo)]
    command += [
        "--backend-directory", str(backend_dir),
        "--http-address", host, "--http-port", str(http_port),
        "--grpc-address", host, "--grpc-port", str(grpc_port),
        "--allow-metrics", "false", "--allow-sagemaker", "false", "--allow-vertex-ai", "false",
        "--strict-readiness", "false", "--exit-on-error", "false",
        "--model-control-mode", "explicit", "--load-model", "*",
        "--exit-timeout-secs", str(grace_seconds),
    ]  # fmt: skip
    env = {"LAYERFUSE_TRITON_SITE": str(install.stub_site.resolve())}
    return command, env
