"""Tiled decoding: one prefill whose cache is repeated into a batch decodes exactly as that
batch prefilled row by row, so the decode benchmark can time batch 8 at long contexts without
the prefill of 8 x context tokens; and the memory of decoding is measured in a fresh process."""

from __future__ import annotations

import pytest

from layerfuse.data import corpus
from layerfuse.errors import LayerfuseError
from layerfuse.generate import Decoder, generate_ids
from layerfuse.generate.memory import decode_memory
from layerfuse.generate.timing import DecodeCase, DecodeTarget, decode_prompts, run_decode_bench
from tests import kv_models


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> kv_models.GenerationModels:
    return kv_models.shared(tmp_path_factory)


def _generate(decoder: Decoder, prompts: list[list[int]], copies: int = 1) -> list[list[int]]:
    eos = [decoder.manifest.generation["eos_token_id"]]
    result = generate_ids(
        decoder, prompts, max_new_tokens=8, eos_token_ids=eos, suppress_eos=True, copies=copies
    )
    assert len(result.step_seconds) == 7
    return result.tokens


def test_a_repeated_cache_decodes_as_identical_prompts_token_for_token(lm):
    """Left padding with positions (export) and right padding (builder graph); two prompts of
    different lengths, so each row's padding and positions are repeated with its cache."""
    one, two = lm.prompts(2)
    for path in (lm.export, lm.builder):
        decoder = Decoder(path, provider="cpu")
        tiled = _generate(decoder, [one], copies=8)
        assert tiled == _generate(decoder, [one] * 8), path
        assert _generate(decoder, [one, two], copies=3) == _generate(
            decoder, [one] * 3 + [two] * 3
        ), path
    with pytest.raises(LayerfuseError, match="copies must be at least 1"):
        _generate(decoder, [one], copies=0)


def test_a_tiled_case_prefills_one_row_and_reports_no_time_to_first_token(lm):
    texts = corpus.split_texts("test")
    cases = [DecodeCase(1, 24, 5), DecodeCase(4, 24, 5, tiled=True)]
    asked: list[DecodeCase] = []

    def prompts(case: DecodeCase) -> list[list[int]]:
        asked.append(case)
        return decode_prompts(lm.tokenizer, texts, case.batch, case.context)

    rows = run_decode_bench(
        [DecodeTarget("export", lm.export), DecodeTarget("builder", lm.builder)],
        cases,
        prompts,
        threads=1,
    )
    assert [(case.batch, case.context) for case in asked[1:]] == [(1, 24), (1, 24)]
    plain, tiled = rows[0], rows[2]
    assert (plain["prefill_rows"], tiled["prefill_rows"]) == (1, 1)
    assert tiled["batch"] == 4 and tiled["time_to_first_token_s"] is None
    assert plain["time_to_first_token_s"] > 0 and tiled["tokens_per_second"] > 0
    assert all(row["tokens_equal_to_peer"] == 1.0 for row in rows)


def test_decode_memory_is_measured_in_a_fresh_process(lm):
    decoder = Decoder(lm.export, provider="cpu")
    prompt = lm.prompts(1)[0]
    result = decode_memory(lm.export, [prompt], new_tokens=6, copies=4, threads=1)
    assert result["rows"] == 4
    assert result["cache_bytes"] == 4 * (len(prompt) + 5) * decoder.kv_bytes_per_token()
    assert result["peak_rss_bytes"] >= result["prefill_peak_rss_bytes"] > result["rss_before_bytes"]
    assert result["peak_rss_bytes"] >= result["decode_peak_rss_bytes"] > 0
    assert result["load_bytes"] > 0
