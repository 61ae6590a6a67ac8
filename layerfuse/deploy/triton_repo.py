"""Triton model repositories: write one model folder, check it, read a repository back.

Layout (what every Triton, and KServe's ``kserve-tritonserver`` runtime, reads)::

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx          (+ external data under the name the graph records)
    REPO/NAME/1/model.py            (python backend only: runs the graph in onnxruntime)

A model folder is assembled and checked in a hidden staging folder inside ``REPO`` and moved
into place with one rename, so a failed check, a missing weight file or an interrupt leaves
the repository as it was. External data keeps its recorded relative path: servers open the
model by path and resolve weights next to it.
"""

from __future__ import annotations

__all__ = [
    "RepoEntry",
    "check_model_dir",
    "check_name",
    "check_siblings",
    "read_repository",
    "write_triton_model",
]

import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from layerfuse.deploy.signature import Signature, external_data_files, graph_signature
from layerfuse.deploy.triton_config import (
    TritonOptions,
    build_config,
    config_problems,
    parse_config,
    render_config,
)
from layerfuse.errors import InvalidModelError, LayerfuseError
from layerfuse.files import staging_dir
from layerfuse.model.io import load_model

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CONFIG = "config.pbtxt"


def check_name(name: str) -> str:
    """Model names become folder names and URL path segments: letters, digits, ``_.-``."""
    if not _NAME.fullmatch(name):
        raise LayerfuseError(
            f"model name '{name}' must start with a letter or digit and hold only letters, "
            f"digits, '_', '.' and '-' (at most 128 characters)"
        )
    return name


@dataclass(frozen=True)
class RepoEntry:
    """One model folder of a repository: its name, backend and the graph its newest version
    serves."""

    name: str
    directory: Path
    backend: str
    model_path: Path


def _place(source: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        target.symlink_to(source.resolve())
    else:
        shutil.copy2(source, target)


def _newest_version(directory: Path) -> Path | None:
    versions = [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


def _entry(directory: Path) -> RepoEntry:
    config = parse_config(directory / CONFIG)
    version = _newest_version(directory)
    if version is None:
        raise LayerfuseError(f"{directory}: no numeric version folder (e.g. {directory}/1)")
    filename = config.default_model_filename if config.backend == "onnxruntime" else ""
    return RepoEntry(
        directory.name, directory, config.backend, version / (filename or "model.onnx")
    )


def check_model_dir(directory: Path, *, load: bool = True) -> list[str]:
    """What is wrong with a model folder: config against graph, files, and (``load``) whether
    onnxruntime opens the graph by path, the way a server will."""
    try:
        entry = _entry(directory)
    except LayerfuseError as exc:
        return [str(exc)]
    if entry.backend == "python" and not (entry.model_path.parent / "model.py").is_file():
        return [f"{entry.model_path.parent}: model.py is missing (python backend)"]
    try:
        # Resolved: a linked graph (``layerfuse serve``'s throw-away repositories) keeps its
        # weights beside the file it links to; the session below opens the path as a server will.
        graph = load_model(entry.model_path.resolve())
    except InvalidModelError as exc:
        return [str(exc)]
    problems = config_problems(
        parse_config(directory / CONFIG), graph_signature(graph), directory.name
    )
    if load and not problems:
        from layerfuse.runtime.session import create_session

        try:
            create_session(entry.model_path, provider="cpu", prepacking=True)
        except LayerfuseError as exc:
            problems.append(str(exc))
    return problems


def write_triton_model(
    model_path: str | os.PathLike,
    repo: str | os.PathLike,
    name: str,
    options: TritonOptions,
    *,
    version: int = 1,
    link: bool = False,
) -> tuple[Path, Signature]:
    """Write ``REPO/NAME`` for ``model_path`` and return the folder and the served signature.

    ``link`` symlinks the graph and its weights instead of copying them (for throw-away
    repositories that ``layerfuse serve`` builds); a deployment copies.
    """
    model_path, repo = Path(model_path), Path(repo)
    target = repo / check_name(name)
    if version < 1:
        raise LayerfuseError(f"version must be at least 1, not {version}")
    if repo.exists() and not repo.is_dir():
        raise LayerfuseError(f"--repo {repo} is a file, not a model repository folder")
    if target.exists():
        raise LayerfuseError(f"{target} already exists (remove it or choose another --name)")
    graph = load_model(model_path)
    signature = graph_signature(graph)
    config = build_config(name, signature, options)
    with staging_dir(repo, "deploy") as staging:
        stage = staging / name
        version_dir = stage / str(version)
        _place(model_path, version_dir / "model.onnx", link)
        for relative in external_data_files(graph):
            _place(model_path.parent / relative, version_dir / relative, link)
        if options.backend == "python":
            template = resources.files("layerfuse.deploy") / "python_backend" / "model.py"
            (version_dir / "model.py").write_text(template.read_text())
        (stage / CONFIG).write_text(render_config(config, model_path.name))
        # A linked folder is served right away, and the server's own load is the last check.
        problems = check_model_dir(stage, load=not link)
        if problems:
            raise LayerfuseError(f"{name}: {'; '.join(problems)}")
        os.replace(stage, target)
    return target, signature


def check_siblings(repo: str | os.PathLike) -> None:
    """Raise if a model folder already in ``repo`` is broken.

    Writing the repository's manifest reads every entry, so a broken sibling would make a
    deployment fail after its folder was placed; checking first fails before anything is
    written.
    """
    repo = Path(repo)
    if repo.is_dir() and any((path / CONFIG).is_file() for path in repo.iterdir()):
        read_repository(repo)


def read_repository(repo: str | os.PathLike) -> list[RepoEntry]:
    """The model folders of a repository (folders holding a ``config.pbtxt``), by name."""
    repo = Path(repo)
    if not repo.is_dir():
        raise LayerfuseError(f"{repo}: no such model repository")
    entries = [
        _entry(path)
        for path in sorted(repo.iterdir())
        if path.is_dir() and not path.name.startswith(".") and (path / CONFIG).is_file()
    ]
    if not entries:
        raise LayerfuseError(f"{repo}: no model folders (NAME/config.pbtxt) in this repository")
    return entries
