#!/usr/bin/env bash
# The multi-turn demo on the CPU: a tiny random Qwen2.5-VL learns to walk 2x2 mazes from the images.
#   prepare -> validate -> SFT (answer format only) -> eval -> GRPO (2 turns, a new image each) -> eval
#   -> check-drift split by turn, then a before/after table and the run's curves.png.
# Usage: scripts/demo-maze.sh VLRL OUTDIR
set -euo pipefail
VLRL=${1:-vlrl}
OUT=${2:-demo-out}
PY=$(dirname "$VLRL")/python
rm -rf "$OUT/maze" "$OUT/eval-maze-sft" "$OUT/eval-maze-grpo" runs/maze-sft runs/maze-grpo && mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
start=$(date +%s)

step "1. a tiny random Qwen2.5-VL (kept from make demo if it is there)"
[ -d "$OUT/tiny-qwen2_5_vl" ] || $VLRL tiny-model "$OUT/tiny-qwen2_5_vl" --family qwen2_5_vl

step "2. 2x2 mazes, 2 moves allowed (the shortest path), 56-px cells"
$VLRL prepare maze2d --out "$OUT/maze" --rows 400 --val-rows 40 --maze-size 2 --max-steps 2 --cell-px 56
$VLRL validate "$OUT/maze/train.parquet" "$OUT/maze/val.parquet" --processor "$OUT/tiny-qwen2_5_vl"

step "3. SFT on the answer format only (a random move as the target)"
$VLRL train recipes/maze2d-tiny-sft.yaml
SFT=runs/maze-sft/checkpoints/step_30/hf

step "4. eval after SFT (greedy, 40 held-out mazes, up to 2 turns)"
$VLRL eval "$SFT" "$OUT/maze/val.parquet" --out "$OUT/eval-maze-sft" --max-new-tokens 8 --max-turns 2

step "5. GRPO, multi-turn (hf engine, ZeRO-2)"
$VLRL train recipes/maze2d-tiny.yaml
GRPO=runs/maze-grpo/checkpoints/$(cat runs/maze-grpo/checkpoints/latest)/hf

step "6. eval after GRPO"
$VLRL eval "$GRPO" "$OUT/maze/val.parquet" --out "$OUT/eval-maze-grpo" --max-new-tokens 8 --max-turns 2

step "7. check-drift on 2-turn episodes, split by turn (hf engine in bf16 vs the fp32 trainer)"
$VLRL check-drift "$GRPO" "$OUT/maze/val.parquet" --samples 16 --max-new-tokens 8 --max-turns 2 --engine-dtype bf16 \
    --max-mean 0.05 --json "$OUT/drift-maze.json"

step "before / after (held-out mazes, greedy)"
"$PY" "$(dirname "$0")/maze_demo_summary.py" "$OUT" maze "$(( $(date +%s) - start ))"
