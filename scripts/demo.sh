#!/usr/bin/env bash
# Set up, then the main job on a real packaged model (SmolLM2-135M): export to ONNX with
# verification against torch, map its blocks and FF sublayers, tie the FF sublayers of four of
# its last blocks with aligned merging (+ least-squares refit), distil the tied graph back
# toward the original, and measure original, tied and recovered graphs side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=runs/demo
LF=.venv/bin/layerfuse
[ -f "$RUN/original/model.onnx" ] || $LF export smollm2-135m -o "$RUN/original"
$LF inspect "$RUN/original/model.onnx"
$LF merge "$RUN/original/model.onnx" -o "$RUN/tied/model.onnx" --blocks 25-28 \
    --method permute --refit --calib-tokens 4096 --valid-tokens 2048
$LF recover "$RUN/original/model.onnx" "$RUN/tied/model.onnx" -o "$RUN/recovered/model.onnx" \
    --plan "$RUN/tied/model.plan.json" --steps 20 --batch-size 4 --grad-accum 1 --seq-len 64 \
    --lr 2e-4 --warmup 2 --eval-every 5 --valid-tokens 2048
$LF bench "$RUN/original/model.onnx" "$RUN/tied/model.onnx" "$RUN/recovered/model.onnx" \
    --names original,tied,recovered --inputs 1x32,1x128 --runs 10 --eval --eval-tokens 4096 \
    --json "$RUN/report.json" --markdown "$RUN/report.md" --plot "$RUN/report.png"
echo "report: $RUN/report.md and $RUN/report.png"
