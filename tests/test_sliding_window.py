"""Sliding-window KV caches: paired by dataflow, exported so that generation is right past
the window, and refused in one line when a cache input cannot be carried on.

Every sliding-window family of the tiny-config matrix (Gemma-2/3 with a window of 16, and
Mistral, Qwen2 and Cohere2 variants with a window of 8) is exported with ``--kv-cache`` and
generated from greedily, prompts and new tokens together well past the window; torch's
``generate`` (which keeps a windowed cache) is the reference, token for token.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import transformers
from onnx import TensorProto, helper

from layerfuse.cli import main
from layerfuse.errors import DataError
from layerfuse.export.kv_cache import cache_routes
from layerfuse.generate import Decoder, generate_ids
from layerfuse.model.cache import cache_entries, paired_cache
from layerfuse.model.manifest import carry_manifest
from layerfuse.runtime.session import create_session
from tests import kv_models
from tests.family_configs import LAYERS, SLIDING_WINDOW_CONFIGS, VOCAB_SIZE

SLIDING = ("gemma2", "gemma3", *SLIDING_WINDOW_CONFIGS)
PROMPT_LENGTHS = (5, 12, 23)
NEW_TOKENS = 24
EOS = 2


@pytest.fixture(scope="module")
def sliding_exports(tmp_path_factory):
    """family -> (Hugging Face folder, ``export --kv-cache`` graph), built on first use."""
    from layerfuse.export.onnx_export import export_model
    from layerfuse.export.sources import load_source

    root, done = tmp_path_factory.mktemp("sliding"), {}

    def get(family: str):
        if family not in done:
            folder = kv_models.sliding_folder(family, root / family / "hf")
            source = load_source(str(folder))
            source.tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
            path = export_model(source, root / family / "kv", kv_cache=True).model_path
            done[family] = (folder, path)
        return done[family]

    return get


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [
        torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS
    ]


@pytest.mark.parametrize("family", SLIDING)
def test_generation_with_the_cache_equals_torch_past_the_sliding_window(sliding_exports, family):
    folder, path = sliding_exports(family)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    window = model.config.sliding_window
    assert window < max(PROMPT_LENGTHS) and window < min(PROMPT_LENGTHS) + NEW_TOKENS
    prompts = _prompts()
    expected = kv_models.torch_greedy(model, prompts, NEW_TOKENS)
    decoder = Decoder(path, provider="cpu")
    assert len(decoder.entries) == 2 * LAYERS
    settings = {"max_new_tokens": NEW_TOKENS, "eos_token_ids": [EOS], "suppress_eos": True}
    single = [generate_ids(decoder, [prompt], **settings).tokens[0] for prompt in prompts]
    assert single == expected
    assert generate_ids(decoder, prompts, **settings).tokens == expected  # left-padded batch
    # The window changes what the model says: the same weights attending to everything differ.
    model.config.sliding_window = 10 * window
    assert kv_models.torch_greedy(model, prompts, NEW_TOKENS) != expected


def _windowed_graph(window: int) -> ir.Graph:
    """Two layers' keys as exporters write them: layer 0 appends with one Concat; layer 1 is
    a sliding-window layer (transformers' ``DynamicSlidingWindowLayer`` traced), which cuts
    the past to the window's last tokens, appends, and cuts the present again, through a
    Cast and an Identity as exporters add them."""
    big = np.iinfo(np.int64).max
    ints = {
        "tail": np.array([-window], np.int64),
        "end": np.array([big], np.int64),
        "seq": np.array([2], np.int64),
        "heads": np.array([0, 0, 2, 8], np.int64),
    }
    nodes = [  # new keys [batch, 2, seq, 8] from hidden states [batch, seq, 16]
        helper.make_node("Reshape", ["hidden", "heads"], ["split"]),
        helper.make_node("Transpose", ["split"], ["new"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2),
        helper.make_node("Slice", ["past_key_values.1.key", "tail", "end", "seq"], ["kept"]),
        helper.make_node("Cast", ["kept"], ["kept_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["kept_f", "new"], ["full"], axis=-2),
        helper.make_node("ReduceSum", ["full"], ["logits"], keepdims=0),
        helper.make_node("Slice", ["full", "tail", "end", "seq"], ["cut"]),
        helper.make_node("Identity", ["cut"], ["present.1.key"]),
    ]

    def tensor(name: str, past: str):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 2, past, 8])

    graph = helper.make_graph(
        nodes,
        "windowed",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", 16]),
            tensor("past_key_values.0.key", "p"),
            tensor("past_key_values.1.key", "p"),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
            tensor("present.0.key", "t"),
            tensor("present.1.key", "t"),
        ],
        [onnx.numpy_helper.from_array(v, k) for k, v in ints.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(model).graph


def test_a_sliding_window_cache_is_paired_through_its_slices():
    """The old pairing (past -> Concat -> present only) found layer 0 alone."""
    graph = _windowed_graph(window=7)
    found = [(e.past.name, e.present.name, e.window) for e in cache_entries(graph)]
    assert found == [
        ("past_key_values.0.key", "present.0.key", None),
        ("past_key_values.1.key", "present.1.key", 7),
    ]
    assert [(e.heads, e.head_dim) for e in paired_cache(graph, "g")] == [(2, 8), (2, 8)]
    graph.outputs.remove(next(v for v in graph.outputs if v.name == "present.1.key"))
    with pytest.raises(DataError) as caught:
        paired_cache(graph, "g")
    assert str(caught.value) == (
        "g: 1 of 2 KV-cache inputs cannot be carried from step to step: "
        "'past_key_values.1.key' (no present output continues it)"
    )


def test_a_cache_input_nothing_continues_is_one_line_for_generate_and_the_export_check(
    sliding_exports, tmp_path, capsys
):
    from layerfuse.model.io import load_model, save_model

    _, source = sliding_exports("gemma2")
    model = load_model(source)
    model.graph.outputs.remove(next(v for v in model.graph.outputs if v.name == "present.1.key"))
    path = save_model(model, tmp_path / "broken" / "model.onnx")
    carry_manifest(source, path)
    reason = (
        "1 of 8 KV-cache inputs cannot be carried from step to step: "
        "'past_key_values.1.key' (no present output continues it)"
    )
    capsys.readouterr()  # what building the models printed
    assert (
        main(["generate", str(path), "--prompt", "the quick brown fox", "--provider", "cpu"]) == 2
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(reason), lines
    with pytest.raises(DataError, match=re.escape(f"the exported graph: {reason}")):
        cache_routes(create_session(path, provider="cpu"))
    assert set(cache_routes(create_session(source, provider="cpu"))) == {
        f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")
    }
