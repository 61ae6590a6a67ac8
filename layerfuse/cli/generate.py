"""``layerfuse generate``: continue a prompt with a KV-cache graph, streaming the text."""

from __future__ import annotations

__all__ = ["register"]

import argparse
import sys
from pathlib import Path

from layerfuse.cli.common import add_provider_option, model_file, positive_int


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run(args: argparse.Namespace) -> int:
    from layerfuse.generate.sampling import Sampling

    sampling = Sampling(args.sample, args.temperature, args.top_p, args.seed)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "sampling": sampling,
        "threads": args.threads,
        "on_text": _write,
    }
    if args.runtime == "genai":
        from layerfuse.generate.genai import generate_text_genai

        provider = "cuda" if args.provider == "cuda" else "cpu"
        _, result = generate_text_genai(
            Path(args.model).parent, args.prompt, provider=provider, **options
        )
    else:
        from layerfuse.generate.text import generate_text

        _, result = generate_text(args.model, args.prompt, provider=args.provider, **options)
    count = sum(len(row) for row in result.tokens)
    print(file=sys.stdout)
    print(
        f"layerfuse: {count} tokens ({args.runtime}); time to first token "
        f"{result.time_to_first_token * 1000:.0f} ms; {result.tokens_per_second:.1f} tokens/s "
        f"after it",
        file=sys.stderr,
    )
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "generate",
        help="continue a prompt with a KV-cache graph (streams the text)",
        description="Greedy or sampled generation with the KV cache kept on the device. The "
        "graph needs cache inputs: a 'layerfuse export --kv-cache' folder, an "
        "onnxruntime-genai builder folder, or a layerfuse variant of either.",
    )
    parser.add_argument(
        "model", type=model_file, help="the .onnx graph (its manifest or genai_config beside it)"
    )
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=64,
        help="tokens to generate at most (default 64)",
    )
    parser.add_argument(
        "--sample", action="store_true", help="sample tokens instead of greedy decoding"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="with --sample: divide logits by this (default 1.0)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="with --sample: draw from the most likely tokens holding this much probability "
        "(default 1.0: all)",
    )
    parser.add_argument("--seed", type=int, help="with --sample: random seed (reproducible)")
    parser.add_argument(
        "--runtime",
        default="ort",
        choices=["ort", "genai"],
        help="ort: layerfuse's decode loop on onnxruntime; genai: onnxruntime-genai's "
        "generator on the model's folder (needs genai_config.json)",
    )
    add_provider_option(parser)
    parser.add_argument(
        "--threads", type=positive_int, help="intra-op threads (default: onnxruntime's)"
    )
    parser.set_defaults(handler=_run)
