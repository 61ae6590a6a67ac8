"""Tiny transformers configs of the family matrix: hidden 32, 4 layers, 4 heads, FF width 64.

One builder per mainstream family, returning (config, model class); ``tests/tiny_models.py``
builds, perturbs and saves them.
"""

from __future__ import annotations

import transformers

VOCAB_SIZE = 256
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 4
HEADS = 4

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
FAMILY_CONFIGS = {
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
WITHOUT_POOLER = ("bert", "roberta", "xlm_roberta", "vit", "deit")

# Sliding-window variants for the KV-cache generation tests (tests/test_sliding_window.py),
# with a window of 8 tokens, shorter than their prompts plus new tokens; Gemma-2/3 above
# slide too (window 16). Not part of the family matrix of docs/models.md.
_WINDOW = 8
SLIDING_WINDOW_CONFIGS = {
    # every layer slides
    "mistral_sliding": lambda: (
        transformers.MistralConfig(**_decoder(num_key_value_heads=2, sliding_window=_WINDOW)),
        transformers.MistralForCausalLM,
    ),
    # layers from max_window_layers on slide, the first two attend to everything
    "qwen2_sliding": lambda: (
        transformers.Qwen2Config(
            **_decoder(
                num_key_value_heads=2,
                use_sliding_window=True,
                sliding_window=_WINDOW,
                max_window_layers=2,
            )
        ),
        transformers.Qwen2ForCausalLM,
    ),
    # parallel block, three sliding layers then a global one
    "cohere2": lambda: (
        transformers.Cohere2Config(**_decoder(num_key_value_heads=2, sliding_window=_WINDOW)),
        transformers.Cohere2ForCausalLM,
    ),
}
