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
VOCAB_SIZE = 256
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 4
HEADS = 4


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 2}
_POSITIONS = 128


def _decoder(**extra) -> dict:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": _POSITIONS,
        **_IDS,
        **extra,
    }


def _encoder(**extra) -> dict:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        **extra,
    }


def _gpt_neox(parallel: bool):
    config = transformers.GPTNeoXConfig(
        rotary_pct=0.25, use_parallel_residual=parallel, **_decoder()
    )
    return config, transformers.GPTNeoXForCausalLM


def _opt(pre_norm: bool):
    config = transformers.OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        ffn_dim=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=_POSITIONS,
        word_embed_proj_dim=HIDDEN,
        do_layer_norm_before=pre_norm,
        **_IDS,
    )
    return config, transformers.OPTForCausalLM


def _falcon(new_architecture: bool):
    config = transformers.FalconConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_hidden_size=INTERMEDIATE,
        new_decoder_architecture=new_architecture,
        num_kv_heads=2 if new_architecture else None,
        multi_query=not new_architecture,
        parallel_attn=True,
        alibi=False,
        bias=False,
        max_position_embeddings=_POSITIONS,
        **_IDS,
    )
    return config, transformers.FalconForCausalLM


# family -> () -> (config, model class); what each one adds is in the comment.
_FAMILY_CONFIGS = {
    "mistral": lambda: (
        transformers.MistralConfig(**_decoder(num_key_value_heads=2, sliding_window=None)),
        transformers.MistralForCausalLM,
    ),
    # biases on the q/k/v projections
    "qwen2": lambda: (
        transformers.Qwen2Config(**_decoder(num_key_value_heads=2)),
        transformers.Qwen2ForCausalLM,
    ),
    # q_norm / k_norm over the head dimension
    "qwen3": lambda: (
        transformers.Qwen3Config(**_decoder(num_key_value_heads=2, head_dim=8)),
        transformers.Qwen3ForCausalLM,
    ),
    # GeGLU with GELU-tanh, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden)
    "gemma": lambda: (
        transformers.GemmaConfig(
            **_decoder(num_key_value_heads=1, head_dim=8, hidden_activation="gelu_pytorch_tanh")
        ),
        transformers.GemmaForCausalLM,
    ),
    # sandwich norms, logit soft-capping, alternating sliding window
    "gemma2": lambda: (
        transformers.Gemma2Config(
            **_decoder(
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16
            )
        ),
        transformers.Gemma2ForCausalLM,
    ),
    # sandwich norms and q/k norms (text-only model)
    "gemma3": lambda: (
        transformers.Gemma3TextConfig(
            **_decoder(
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16
            )
        ),
        transformers.Gemma3ForCausalLM,
    ),
    # output norms only (no pre-norm), q/k norms over the full width
    "olmo2": lambda: (
        transformers.Olmo2Config(**_decoder(num_key_value_heads=2)),
        transformers.Olmo2ForCausalLM,
    ),
    # Phi-2: parallel attention + FF sharing one LayerNorm, partial rotary, gelu_new
    "phi": lambda: (
        transformers.PhiConfig(**_decoder(partial_rotary_factor=0.5, hidden_act="gelu_new")),
        transformers.PhiForCausalLM,
    ),
    # fused qkv_proj and gate_up_proj (one MatMul, then Split/Slice)
    "phi3": lambda: (
        transformers.Phi3Config(**_decoder(num_key_value_heads=2)),
        transformers.Phi3ForCausalLM,
    ),
    # parallel residual with two LayerNorms, and the sequential variant
    "gpt_neox": lambda: _gpt_neox(parallel=True),
    "gpt_neox_seq": lambda: _gpt_neox(parallel=False),
    # ReLU, learned positions; opt-350m style post-norm behind a Reshape
    "opt": lambda: _opt(pre_norm=True),
    "opt_postnorm": lambda: _opt(pre_norm=False),
    # parallel: 7B style (one shared LayerNorm, multi-query) and the new decoder architecture
    "falcon": lambda: _falcon(new_architecture=False),
    "falcon_new": lambda: _falcon(new_architecture=True),
    # parallel, one shared LayerNorm, rotary on part of each head, biases on the FF only
    "gptj": lambda: (
        transformers.GPTJConfig(
            vocab_size=VOCAB_SIZE,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            rotary_dim=4,
            n_positions=_POSITIONS,
            bos_token_id=2,
            eos_token_id=2,
        ),
        transformers.GPTJForCausalLM,
    ),
    # positions offset by padding_idx + 1
    "roberta": lambda: (
        transformers.RobertaConfig(
            **_encoder(max_position_embeddings=_POSITIONS + 2, pad_token_id=0)
        ),
        transformers.RobertaModel,
    ),
    "xlm_roberta": lambda: (
        transformers.XLMRobertaConfig(
            **_encoder(max_position_embeddings=_POSITIONS + 2, pad_token_id=0)
        ),
        transformers.XLMRobertaModel,
    ),
    # sa_layer_norm / output_layer_norm (post-norm), its own config names
    "distilbert": lambda: (
        transformers.DistilBertConfig(
            vocab_size=VOCAB_SIZE,
            dim=HIDDEN,
            hidden_dim=INTERMEDIATE,
            n_layers=LAYERS,
            n_heads=HEADS,
            max_position_embeddings=_POSITIONS,
            pad_token_id=0,
        ),
        transformers.DistilBertModel,
    ),
    # CLS + distillation token
    "deit": lambda: (
        transformers.DeiTConfig(**_encoder(image_size=32, patch_size=8)),
        transformers.DeiTModel,
    ),
}
_WITHOUT_POOLER = ("bert", "roberta", "xlm_roberta", "vit", "deit")
FAMILIES = ("llama", "gpt2", "bert", "vit", *_FAMILY_CONFIGS)
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
    if family in _FAMILY_CONFIGS:
        config, model_class = _FAMILY_CONFIGS[family]()
        kwargs = {"add_pooling_layer": False} if family in _WITHOUT_POOLER else {}
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
