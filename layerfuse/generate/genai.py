"""``--runtime genai``: a builder folder (or a variant of one) through onnxruntime-genai.

onnxruntime-genai runs the folder its model builder wrote (``genai_config.json`` names the
graph, its inputs, the cache templates and the context) with its own generator, which keeps
the cache in place with a shared past/present buffer. This is the runtime most onnxruntime
LLM users deploy and the peer layerfuse's decode benchmark measures against; the timings
follow :class:`~layerfuse.generate.loop.Generation` so both runtimes report alike.
"""

from __future__ import annotations

__all__ = ["GenaiGenerator", "generate_text_genai"]

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from layerfuse.errors import DataError, LayerfuseError
from layerfuse.generate.loop import Generation, check_context, token_ids
from layerfuse.generate.sampling import GREEDY, Sampling
from layerfuse.model.genai import GENAI_CONFIG, read_genai_config


def _genai():
    try:
        import onnxruntime_genai
    except ImportError:
        raise LayerfuseError(
            "--runtime genai needs onnxruntime-genai: pip install 'layerfuse[genai]'"
        ) from None
    return onnxruntime_genai


class GenaiGenerator:
    """onnxruntime-genai's model and generator for one folder."""

    def __init__(
        self, folder: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None
    ) -> None:
        og = _genai()
        self.folder = Path(folder)
        self.config = read_genai_config(self.folder)
        if self.config is None:
            raise DataError(
                f"{self.folder} has no {GENAI_CONFIG}: onnxruntime-genai runs folders written "
                f"by its model builder (python -m onnxruntime_genai.models.builder) or "
                f"layerfuse variants of one; use --runtime ort for this graph"
            )
        config = og.Config(str(self.folder))
        config.clear_providers()
        if provider == "cuda":
            config.append_provider("cuda")
        if threads:
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            overlay = {"model": {"decoder": {"session_options": options}}}
            config.overlay(json.dumps(overlay))
        try:
            self.model = og.Model(config)
        except RuntimeError as exc:
            raise LayerfuseError(f"onnxruntime-genai cannot load {self.folder}: {exc}") from None
        self.og = og

    @property
    def context_length(self) -> int | None:
        return self.config["model"].get("context_length")

    @property
    def eos_token_ids(self) -> list[int]:
        return token_ids(self.config["model"].get("eos_token_id"))

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        suppress_eos: bool = False,
        on_token: Callable[[np.ndarray], None] | None = None,
    ) -> Generation:
        """Like :func:`~layerfuse.generate.loop.generate_ids`, in onnxruntime-genai.

        Rows of different lengths are padded on the right with the pad token, as
        onnxruntime-genai's own ``encode_batch`` does.
        """
        check_context(prompts, max_new_tokens, self.context_length)
        longest = max(len(p) for p in prompts)
        pad = token_ids(self.config["model"].get("pad_token_id")) or [0]
        ids = np.full((len(prompts), longest), pad[0], dtype=np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": longest + max_new_tokens, "batch_size": len(prompts)}
        if suppress_eos:
            options["min_length"] = longest + max_new_tokens
        options["do_sample"] = sampling.sample
        if sampling.sample:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        return self._run(generator, ids, max_new_tokens, on_token)

    def _run(self, generator, ids, max_new_tokens, on_token) -> Generation:
        eos = self.eos_token_ids
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        result = Generation([[] for _ in ids], [len(row) for row in ids], 0.0)
        result.time_to_first_token = time.perf_counter() - started
        finished = np.zeros(len(ids), dtype=bool)
        for step in range(max_new_tokens):
            if step:
                if generator.is_done():
                    break
                began = time.perf_counter()
                generator.generate_next_token()
                result.step_seconds.append(time.perf_counter() - began)
            tokens = np.asarray(generator.get_next_tokens(), dtype=np.int64)
            if result.record(tokens, finished, eos, on_token):
                break
        return result


def _tokenizer(generator: GenaiGenerator):
    try:
        return generator.og.Tokenizer(generator.model)
    except RuntimeError as exc:
        raise LayerfuseError(
            f"onnxruntime-genai cannot read the tokenizer in {generator.folder}: {exc}"
        ) from None


def generate_text_genai(
    folder: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    provider: str = "cpu",
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> tuple[str, Generation]:
    """Continue ``prompt`` with onnxruntime-genai, streaming through its tokenizer."""
    generator = GenaiGenerator(folder, provider=provider, threads=threads)
    tokenizer = _tokenizer(generator)
    stream = tokenizer.create_stream()

    def emit(tokens) -> None:
        piece = stream.decode(int(tokens[0]))
        if piece and on_text is not None:
            on_text(piece)

    prompt_ids = [int(t) for t in tokenizer.encode(prompt)]
    result = generator.generate_ids(
        [prompt_ids], max_new_tokens=max_new_tokens, sampling=sampling, on_token=emit
    )
    return tokenizer.decode(result.tokens[0]), result
