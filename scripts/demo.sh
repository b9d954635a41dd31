#!/usr/bin/env bash
# The end-to-end demo on the CPU: tiny model, synthetic colours task and the real Geometry3K sample.
# Usage: scripts/demo.sh VLRL OUTDIR
set -euo pipefail
VLRL=${1:-vlrl}
OUT=${2:-demo-out}
SAMPLE=../shared/data/geometry3k-sample
rm -rf "$OUT" && mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build a tiny random Qwen2.5-VL (real architecture, local tokenizer)"
$VLRL tiny-model "$OUT/tiny-qwen2_5_vl" --family qwen2_5_vl

step "prepare the synthetic colours task"
$VLRL prepare colors --out "$OUT/colors" --rows 600 --num-colors 4

step "validate it, counting prompt tokens with the model's processor"
$VLRL validate "$OUT/colors/train.parquet" "$OUT/colors/val.parquet" --processor "$OUT/tiny-qwen2_5_vl" --max-prompt-tokens 128

if [ -d "$SAMPLE" ]; then
  step "prepare the real Geometry3K sample (original layout)"
  $VLRL prepare geometry3k --path "$SAMPLE" --out "$OUT/geometry3k"
  step "validate it"
  $VLRL validate "$OUT/geometry3k/train.parquet" --processor "$OUT/tiny-qwen2_5_vl" --max-prompt-tokens 1024
fi
step "done: outputs in $OUT/"
