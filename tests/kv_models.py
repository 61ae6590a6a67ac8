"""A tiny Llama for generation tests, exported with a KV cache and built by onnxruntime-genai.

One Hugging Face folder (random weights, a byte-level BPE tokenizer trained on the fortunes
calibration split so that onnxruntime-genai's tokenizer reads it too) is turned into both
graphs users generate with: ``layerfuse export --kv-cache`` (torch dynamo, plain ops) and the
onnxruntime-genai model builder (GroupQueryAttention, fused residual norms). Both therefore
compute the same function, and the torch model is the reference for either. Head size 16:
onnxruntime's CPU GroupQueryAttention needs a multiple of 16.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 384
HIDDEN = 64
LAYERS = 4
HEADS = 4
KV_HEADS = 2
CONTEXT = 256
NEW_TOKENS = 32


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from layerfuse.data import corpus

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus.split_texts("calib")[:2000], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
    )


def make_model(tokenizer) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


class _NoAttention(torch.nn.Module):
    """Stands in for a removed attention sublayer: adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class GenerationModels:
    """The folder, the two graphs and torch references, built once per test session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokenizer = make_tokenizer()
        self.folder = root / "hf"
        make_model(self.tokenizer).save_pretrained(self.folder)
        self.tokenizer.save_pretrained(self.folder)
        self._export: Path | None = None
        self._builder: Path | None = None

    def torch_model(self, drop_attention: tuple[int, ...] = ()) -> transformers.LlamaForCausalLM:
        model = transformers.AutoModelForCausalLM.from_pretrained(self.folder).eval()
        for index in drop_attention:
            model.model.layers[index].self_attn = _NoAttention()
        return model

    @property
    def export(self) -> Path:
        if self._export is None:
            from layerfuse.export.onnx_export import export_model
            from layerfuse.export.sources import load_source

            source = load_source(str(self.folder))
            self._export = export_model(source, self.root / "kv", kv_cache=True).model_path
        return self._export

    @property
    def builder(self) -> Path:
        if self._builder is None:
            self._builder = self.build("fp32")
        return self._builder

    def build(self, precision: str) -> Path:
        """The onnxruntime-genai builder's graph of the folder at ``precision`` (fp32, int4)."""
        from layerfuse.export.genai_builder import build_genai_folder

        return build_genai_folder(
            self.folder, self.root / f"genai-{precision}", precision=precision
        )

    def prompts(self, count: int = 5) -> list[list[int]]:
        """Real prompts: fortunes of the test split, cut to different lengths."""
        from layerfuse.data import corpus

        texts = corpus.split_texts("test")[:count]
        return [self.tokenizer(t)["input_ids"][: 12 + 7 * i] for i, t in enumerate(texts)]

    def torch_greedy(
        self, prompts: list[list[int]], drop_attention: tuple[int, ...] = ()
    ) -> list[list[int]]:
        """``generate`` with EOS suppressed for all new tokens, one prompt at a time."""
        model = self.torch_model(drop_attention)
        return torch_greedy(model, prompts, NEW_TOKENS, self.tokenizer.pad_token_id)


def torch_greedy(
    model, prompts: list[list[int]], new_tokens: int, pad_token_id: int = 0
) -> list[list[int]]:
    """torch's greedy ``generate``, exactly ``new_tokens`` per prompt, one prompt at a time:
    the reference every generation test compares layerfuse's loop with."""
    rows = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id,
            )
        rows.append(out[0, len(prompt) :].tolist())
    return rows


_SHARED: dict[Path, GenerationModels] = {}


def shared(tmp_path_factory) -> GenerationModels:
    """One set of models per test session, whichever test file asks first."""
    base = tmp_path_factory.getbasetemp()
    if base not in _SHARED:
        _SHARED[base] = GenerationModels(tmp_path_factory.mktemp("generation"))
    return _SHARED[base]


def sliding_folder(family: str, folder: Path) -> Path:
    """A tiny sliding-window model of the family matrix (Gemma-2/3 there, or one of
    :data:`tests.family_configs.SLIDING_WINDOW_CONFIGS`) saved with the tiny tokenizer,
    perturbed like the matrix's models."""
    from tests import tiny_models
    from tests.family_configs import FAMILY_CONFIGS, SLIDING_WINDOW_CONFIGS

    if family in FAMILY_CONFIGS:
        return tiny_models.save_folder(family, folder)
    torch.manual_seed(0)
    config, model_class = SLIDING_WINDOW_CONFIGS[family]()
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model.eval().save_pretrained(folder)
    tiny_models.make_tokenizer().save_pretrained(folder)
    return folder
