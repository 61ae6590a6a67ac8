"""onnxruntime-genai builder folders: their manifest, and the folder of a variant of one.

The model builder (PyPI ``onnxruntime-genai``) writes ``model.onnx``, ``genai_config.json``
and the tokenizer files into one folder, which is what most onnxruntime LLM users deploy.
layerfuse reads such a folder without writing into it: :func:`genai_manifest_fields` synthesizes
the manifest from ``genai_config.json`` on every read (a ``layerfuse.json`` written on first
use would go stale when the user rebuilds the folder).

A variant written elsewhere (``layerfuse fuse gen/model.onnx -o fused/model.onnx``) gets the
folder's tokenizer and processing files and a ``genai_config.json`` that matches the new
graph, so ``og.Model("fused")`` runs it: ``decoder.filename`` names the variant, and
``decoder.num_hidden_layers`` counts the KV-cache layers the graph still has. genai uses that
number as the count of cache layers (attention removal renumbers the remaining cache inputs
consecutively, see :mod:`layerfuse.passes.kv_cache`); it also auto-discovers cache inputs by
the name template since version 0.18.
"""

from __future__ import annotations

__all__ = ["GENAI_CONFIG", "carry_genai_folder", "genai_manifest_fields", "read_genai_config"]

import json
import os
import shutil
from pathlib import Path

import onnx
import onnx_ir as ir

from layerfuse.errors import DataError
from layerfuse.files import write_json_atomic
from layerfuse.model.cache import cache_entries

GENAI_CONFIG = "genai_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_MODEL_SUFFIXES = (".onnx", ".data", ".onnx_data", ".plan.json")


def read_genai_config(folder: str | os.PathLike) -> dict | None:
    """The folder's ``genai_config.json``, or None if it has none."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        config["model"]["decoder"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable onnxruntime-genai config ({exc!r})") from None
    return config


def genai_manifest_fields(model_path: str | os.PathLike) -> dict | None:
    """The manifest fields of a builder folder, or None if ``model_path`` is not in one."""
    folder = Path(model_path).parent
    config = read_genai_config(folder)
    if config is None:
        return None
    model = config["model"]
    decoder = model["decoder"]
    has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    return dict(
        source=folder.name,
        origin=f"onnxruntime-genai builder folder {folder}",
        task="causal-lm",
        model_type=str(model.get("type", "unknown")),
        inputs=[decoder["inputs"].get(k, k) for k in ("input_ids", "attention_mask")],
        output=decoder["outputs"].get("logits", "logits"),
        exporter="onnxruntime-genai",
        opset=0,
        tokenizer="." if has_tokenizer else None,
        config={
            "num_layers": decoder.get("num_hidden_layers"),
            "hidden_size": decoder.get("hidden_size"),
            "num_attention_heads": decoder.get("num_attention_heads"),
            "vocab_size": model.get("vocab_size"),
        },
        generation={
            "kv_cache": True,
            "num_layers": decoder.get("num_hidden_layers"),
            "kv_heads": decoder.get("num_key_value_heads"),
            "head_dim": decoder.get("head_size"),
            "context_length": model.get("context_length"),
            "eos_token_id": model.get("eos_token_id"),
            "bos_token_id": model.get("bos_token_id"),
            "pad_token_id": model.get("pad_token_id"),
            "padding": "right",
            "genai": True,
        },
    )


def _cache_layer_count(model_path: Path) -> int:
    graph = ir.serde.deserialize_model(onnx.load(model_path, load_external_data=False)).graph
    return len(cache_entries(graph)) // 2


def carry_genai_folder(source_model: str | os.PathLike, target_model: str | os.PathLike) -> None:
    """Give a variant's folder the builder folder's files and a config that matches it.

    Files already in the target folder are kept; ``genai_config.json`` is always rewritten.
    """
    source_dir, target = Path(source_model).parent, Path(target_model)
    config = read_genai_config(source_dir)
    if config is None:
        return
    for path in source_dir.iterdir():
        if not path.is_file() or path.name == GENAI_CONFIG or path.name.endswith(_MODEL_SUFFIXES):
            continue
        if not (target.parent / path.name).exists():
            shutil.copy2(path, target.parent / path.name)
    decoder = config["model"]["decoder"]
    decoder["filename"] = target.name
    decoder["num_hidden_layers"] = _cache_layer_count(target)
    write_json_atomic(target.parent / GENAI_CONFIG, config)
