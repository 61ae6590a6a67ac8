"""onnxruntime-genai builder folders from the models layerfuse loads, offline.

The model builder (``python -m onnxruntime_genai.models.builder``) reads a Hugging Face folder
and writes the graph most onnxruntime LLM users deploy (GroupQueryAttention, fused residual
norms, a ``genai_config.json``). It cannot read the packaged GGUF model here (it asks the hub
for the config), and a GGUF-loaded transformers model refuses ``save_pretrained``, so the
weights are first copied into a fresh model of the same config and saved as a folder.
"""

from __future__ import annotations

__all__ = ["build_genai_folder", "save_hf_folder"]

import copy
import os
import subprocess
import sys
from pathlib import Path

from layerfuse.errors import LayerfuseError
from layerfuse.export.sources import ModelSource


def save_hf_folder(source: ModelSource, folder: str | os.PathLike) -> Path:
    """Write ``source`` (model and tokenizer) as a Hugging Face folder the builder reads."""
    import transformers

    folder = Path(folder)
    config = copy.deepcopy(source.model.config)
    if getattr(config, "quantization_config", None) is not None:
        # The GGUF's quantization note; the weights are already dequantized to float32.
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(source.model.state_dict())
    model.eval().save_pretrained(folder)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(folder)
    return folder


def build_genai_folder(
    hf_folder: str | os.PathLike, output: str | os.PathLike, *, precision: str = "fp32"
) -> Path:
    """Run the model builder on ``hf_folder`` for the CPU; return the written ``model.onnx``."""
    output = Path(output)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder)]
    command += ["-o", str(output), "-p", precision, "-e", "cpu"]
    command += ["-c", str(output.parent / f".{output.name}-builder-cache")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise LayerfuseError(f"the onnxruntime-genai model builder failed: {lines[-1]}")
    return output / "model.onnx"
