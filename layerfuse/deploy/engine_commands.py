"""The command line that starts each engine on what the user named.

Split from :mod:`layerfuse.deploy.serve` so that one module knows each engine's flags and
repository rules (the bundled tritonserver serves Python-backend models only; KServe serves
any graph through :mod:`layerfuse.deploy.kserve_server`), and the other the lifecycle.
"""

from __future__ import annotations

__all__ = ["kserve_command_for", "triton_command_for"]

import sys
from pathlib import Path

from layerfuse.deploy.triton_config import TritonOptions
from layerfuse.deploy.triton_repo import read_repository, write_triton_model
from layerfuse.errors import LayerfuseError


def triton_command_for(files, repos, options, workdir: Path, ports: tuple[int, int]):
    from layerfuse.deploy.triton_server import find_triton, triton_command

    if options.provider == "cuda":
        raise LayerfuseError(
            "the bundled Triton's Python stub runs onnxruntime on CPU; use --engine kserve "
            "for CUDA, or a Triton image with a repository deployed with --device gpu"
        )
    install = find_triton(options.stub_site)
    for repo in repos:
        for entry in read_repository(repo):
            if entry.backend != "python":
                raise LayerfuseError(
                    f"{entry.directory} uses Triton's {entry.backend} backend, which the "
                    f"bundled tritonserver lacks: serve it with --engine kserve, a Triton "
                    f"image, or redeploy it with --backend python"
                )
    if files:
        generated = workdir / "repository"
        triton = TritonOptions(
            backend="python",
            max_batch_size=options.max_batch_size,
            instances=options.instances,
            threads=options.threads,
            max_input_elements=options.max_input_elements,
        )
        for name, path in files.items():
            write_triton_model(path, generated, name, triton, link=True)
        repos = [*repos, generated]
    backends = install.backend_directory(workdir / "backends")
    return triton_command(
        install,
        [repo.resolve() for repo in repos],
        backends,
        host="127.0.0.1",
        http_port=ports[0],
        grpc_port=ports[1],
        grace_seconds=options.grace_seconds,
    )


def kserve_command_for(files, repos, options):
    models = dict(files)
    for repo in repos:
        for entry in read_repository(repo):
            if entry.name in models:
                raise LayerfuseError(f"two models are named '{entry.name}'")
            models[entry.name] = entry.model_path
    command = [
        sys.executable, "-m", "layerfuse.deploy.kserve_server",
        "--host", options.host,
        "--http-port", str(options.http_port), "--grpc-port", str(options.grpc_port),
        "--max-body-bytes", str(options.max_body_bytes),
        "--max-input-elements", str(options.max_input_elements),
        "--threads", str(options.threads), "--provider", options.provider,
        "--grace-seconds", str(options.grace_seconds),
        *(f"{name}={path.resolve()}" for name, path in models.items()),
    ]  # fmt: skip
    return command, {}
