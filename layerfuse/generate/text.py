"""Text in, streamed text out: the tokenizer from the model's folder around the decode loop."""

from __future__ import annotations

__all__ = ["TextStream", "generate_text", "model_tokenizer"]

import os
from collections.abc import Callable
from pathlib import Path

from layerfuse.data.tokens import load_tokenizer
from layerfuse.errors import DataError
from layerfuse.generate.decoder import Decoder
from layerfuse.generate.loop import Generation, generate_ids, token_ids
from layerfuse.generate.sampling import GREEDY, Sampling


class TextStream:
    """Turns tokens into text as they arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed) :], text
        return new


def model_tokenizer(decoder: Decoder):
    manifest = decoder.manifest
    if not manifest.tokenizer:
        raise DataError(f"{decoder.model_path}: the manifest names no tokenizer for text")
    return load_tokenizer(Path(decoder.model_path).parent / manifest.tokenizer)


def generate_text(
    model_path: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    provider: str = "auto",
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> tuple[str, Generation]:
    """Continue ``prompt`` with the graph at ``model_path``; stream the text to ``on_text``."""
    decoder = Decoder(model_path, provider=provider, threads=threads)
    tokenizer = model_tokenizer(decoder)
    prompt_ids = tokenizer(prompt)["input_ids"]
    eos = token_ids(decoder.manifest.generation.get("eos_token_id", tokenizer.eos_token_id))
    stream = TextStream(tokenizer)

    def emit(tokens) -> None:
        piece = stream.push(int(tokens[0]))
        if piece and on_text is not None:
            on_text(piece)

    result = generate_ids(
        decoder,
        [prompt_ids],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_ids=eos,
        on_token=emit,
    )
    return tokenizer.decode(result.tokens[0], skip_special_tokens=True), result
