#!/usr/bin/env bash
# Set up, then the main job on a real packaged model (SmolLM2-135M): export to ONNX with
# verification against torch, map its blocks and FF sublayers, and measure it in onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=runs/smollm2
.venv/bin/layerfuse export smollm2-135m -o "$RUN"
.venv/bin/layerfuse inspect "$RUN/model.onnx"
.venv/bin/layerfuse evaluate "$RUN/model.onnx" --tokens 4096
