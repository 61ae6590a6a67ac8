"""Tiny random-weight transformers for fast tests: one per architecture family.

Each is saved as a Hugging Face folder with a small word-level tokenizer, then exported
through the same :func:`layerfuse.export.onnx_export.export_model` users call, so the tests
exercise the real export path. Random weights are fine for structure and equivalence tests;
quality claims are made on the real packaged models only.

``llama``, ``gpt2``, ``bert`` and ``vit`` are the suite's original four (other tests depend
on their exact configs). :data:`FAMILIES` adds one tiny config per mainstream family for the
family matrix (``tests/test_families.py``): hidden 32, 4 layers, 4 heads, FF width 64.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.family_configs import (
    FAMILY_CONFIGS,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    VOCAB_SIZE,
    WITHOUT_POOLER,
)

WORDS = (
    "the a of and to in is it that was for on are with as be at this by from or have an "
    "not but they which one you all were her she there would their we him been has when who "
    "will more no if out so said what up its about into than them can only other new some "
    "could time these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take three "
    "hello world quick brown fox jumps lazy dog feed forward layers hold parameters short graph"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


FAMILIES = ("llama", "gpt2", "bert", "vit", *FAMILY_CONFIGS)
VISION = ("vit", "deit")


def _original(family: str) -> torch.nn.Module:
    """The suite's first four tiny models, exactly as other tests expect them."""
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        model = transformers.LlamaForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=128,
        )
        model = transformers.BertModel(config, add_pooling_layer=False)
    elif family == "vit":
        config = transformers.ViTConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            image_size=32,
            patch_size=8,
        )
        model = transformers.ViTModel(config, add_pooling_layer=False)
    else:
        raise ValueError(family)
    return model


def make_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family in FAMILY_CONFIGS:
        config, model_class = FAMILY_CONFIGS[family]()
        kwargs = {"add_pooling_layer": False} if family in WITHOUT_POOLER else {}
        model = model_class(config, **kwargs)
    else:
        model = _original(family)
    # Random init leaves norms at exactly 1 and biases at 0; perturb them so that tests can
    # tell layers apart and exporters cannot deduplicate them.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def save_folder(family: str, folder: Path) -> Path:
    model = make_model(family)
    model.save_pretrained(folder)
    if family not in VISION:
        make_tokenizer().save_pretrained(folder)
    return folder


def mlp_parameter_count(model: torch.nn.Module, family: str) -> list[int]:
    """Parameters of each layer's FF sublayer, counted in torch."""
    if family == "llama":
        mlps = [layer.mlp for layer in model.model.layers]
    elif family == "gpt2":
        mlps = [block.mlp for block in model.transformer.h]
    elif family == "bert":
        mlps = [
            torch.nn.ModuleList([layer.intermediate.dense, layer.output.dense])
            for layer in model.encoder.layer
        ]
    else:
        mlps = [layer.mlp for layer in model.layers]
    return [sum(p.numel() for p in mlp.parameters()) for mlp in mlps]
