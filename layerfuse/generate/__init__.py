"""Generation with a KV cache: the decode loop on plain onnxruntime sessions (cache kept on the
device), sampling, streaming text, and onnxruntime-genai as a second runtime."""

from layerfuse.generate.decoder import Decoder, pad_prompts
from layerfuse.generate.loop import Generation, generate_ids
from layerfuse.generate.sampling import Sampler, Sampling
from layerfuse.generate.text import TextStream, generate_text

__all__ = [
    "Decoder",
    "Generation",
    "Sampler",
    "Sampling",
    "TextStream",
    "generate_ids",
    "generate_text",
    "pad_prompts",
]
