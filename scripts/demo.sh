#!/usr/bin/env bash
# Set up, then the main job on a real packaged model (SmolLM2-135M): export to ONNX with
# verification against torch, map its blocks, remove a fifth of its parameters the way that
# keeps quality best on a CPU budget today (the 8 blocks of lowest block influence; see
# benchmarks/results/quality_compute.md, where merging still trails), distil the pruned graph
# back toward the original for 15 CPU-minutes, and measure the three graphs side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=runs/demo
LF=.venv/bin/layerfuse
[ -f "$RUN/original/model.onnx" ] || $LF export smollm2-135m -o "$RUN/original"
$LF inspect "$RUN/original/model.onnx"
$LF prune "$RUN/original/model.onnx" -o "$RUN/pruned/model.onnx" --target block --count 8
$LF recover "$RUN/original/model.onnx" "$RUN/pruned/model.onnx" -o "$RUN/recovered/model.onnx" \
    --plan "$RUN/pruned/model.plan.json" --budget-minutes 15 --steps 200 --batch-size 4 \
    --grad-accum 1 --seq-len 128 --lr 5e-4 --warmup 2 --eval-every 0 --patience 0
$LF bench "$RUN/original/model.onnx" "$RUN/pruned/model.onnx" "$RUN/recovered/model.onnx" \
    --names original,pruned,recovered --inputs 1x32,1x128 --runs 10 --eval --eval-tokens 4096 \
    --json "$RUN/report.json" --markdown "$RUN/report.md" --plot "$RUN/report.png"
echo "report: $RUN/report.md and $RUN/report.png"
