"""A tiny Llama written as a GGUF file, the way llama.cpp ships models.

transformers builds a config from a GGUF's metadata that names no ``architectures`` (the case
that made layerfuse export every GGUF as an encoder), and a tokenizer from its vocabulary:
byte-level BPE here, as SmolLM2's, with the file's ``add_bos_token`` flag deciding whether
the tokenizer puts BOS in front of a text.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Every byte as a token, one merge, then EOS and BOS (control tokens, as llama.cpp marks them).
TOKENS = [*bytes_to_unicode().values(), "th", "<|endoftext|>", "<|im_start|>"]
EOS_ID, BOS_ID = len(TOKENS) - 2, len(TOKENS) - 1


def _model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config)


def _write_metadata(writer: gguf.GGUFWriter, config, add_bos: bool) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    control = gguf.TokenType.CONTROL
    writer.add_token_types([gguf.TokenType.NORMAL] * EOS_ID + [control, control])
    writer.add_token_merges(["t h"])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(add_bos)


def write_tiny_llama(path: Path, *, add_bos: bool) -> Path:
    """A 2-layer Llama with random weights, stored in float32 under llama.cpp's tensor names."""
    model = _model()
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, model.config, add_bos)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        module, _, kind = name.rpartition(".")
        writer.add_tensor(f"{names.get_name(module)}.{kind}", tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
