#!/usr/bin/env bash
# The multi-turn demos on the CPU: a tiny random Qwen2.5-VL learns to walk mazes from the images.
#   prepare -> validate -> SFT (answer format only) -> eval -> GRPO (a new frame after every move) -> eval
#   -> check-drift split by turn, then a before/after table and the run's curves.
# Usage: scripts/demo-maze.sh VLRL OUTDIR [SIZE]
#   SIZE 2 (make demo-maze, ~7 min on 2 cores): 2x2 mazes, 2 moves, every frame in context; a blind policy's best
#     is 0.5.
#   SIZE 3 (make demo-maze3, ~35 min): 3x3 mazes whose only route takes 4 moves, 4 moves, the last 2 frames in
#     context, progress reward; a blind policy solves 0.25 (docs/demo.md).
set -euo pipefail
VLRL=${1:-vlrl}
OUT=${2:-demo-out}
SIZE=${3:-2}
PY=$(dirname "$VLRL")/python
case "$SIZE" in
  2) TAG=maze; RECIPE=maze2d-tiny; MOVES=2; PREPARE=(--maze-size 2 --max-steps 2); HISTORY=() ;;
  3) TAG=maze3; RECIPE=maze3-tiny; MOVES=4; HISTORY=(--history-images 2)
     PREPARE=(--maze-size 3 --min-moves 4 --max-moves 4 --max-steps 4 --reward progress) ;;
  *) echo "error: SIZE must be 2 or 3, got $SIZE" >&2; exit 2 ;;
esac
rm -rf "$OUT/$TAG" "$OUT/eval-$TAG-sft" "$OUT/eval-$TAG-grpo" "runs/$TAG-sft" "runs/$TAG-grpo" && mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
start=$(date +%s)

step "1. a tiny random Qwen2.5-VL (kept from make demo if it is there)"
[ -d "$OUT/tiny-qwen2_5_vl" ] || $VLRL tiny-model "$OUT/tiny-qwen2_5_vl" --family qwen2_5_vl

step "2. ${SIZE}x${SIZE} mazes, $MOVES moves allowed (the shortest route), 56-px cells"
$VLRL prepare maze2d --out "$OUT/$TAG" --rows 400 --val-rows 40 --cell-px 56 "${PREPARE[@]}"
$VLRL validate "$OUT/$TAG/train.parquet" "$OUT/$TAG/val.parquet" --processor "$OUT/tiny-qwen2_5_vl"

step "3. SFT on the answer format only (a random move as the target)"
$VLRL train "recipes/$RECIPE-sft.yaml"
SFT="runs/$TAG-sft/checkpoints/step_30/hf"

step "4. eval after SFT (greedy, 40 held-out mazes, up to $MOVES moves)"
$VLRL eval "$SFT" "$OUT/$TAG/val.parquet" --out "$OUT/eval-$TAG-sft" --max-new-tokens 8 --max-turns "$MOVES" ${HISTORY[@]+"${HISTORY[@]}"}

step "5. GRPO, multi-turn (hf engine, ZeRO-2)"
$VLRL train "recipes/$RECIPE.yaml"
GRPO="runs/$TAG-grpo/checkpoints/$(cat "runs/$TAG-grpo/checkpoints/latest")/hf"

step "6. eval after GRPO"
$VLRL eval "$GRPO" "$OUT/$TAG/val.parquet" --out "$OUT/eval-$TAG-grpo" --max-new-tokens 8 --max-turns "$MOVES" ${HISTORY[@]+"${HISTORY[@]}"}

step "7. check-drift on $MOVES-move episodes, split by turn (hf engine in bf16 vs the fp32 trainer)"
$VLRL check-drift "$GRPO" "$OUT/$TAG/val.parquet" --samples 16 --max-new-tokens 8 --max-turns "$MOVES" ${HISTORY[@]+"${HISTORY[@]}"} \
    --engine-dtype bf16 --max-mean 0.05 --json "$OUT/drift-$TAG.json"

step "before / after (held-out mazes, greedy)"
"$PY" "$(dirname "$0")/maze_demo_summary.py" "$OUT" "$TAG" "$(( $(date +%s) - start ))"
