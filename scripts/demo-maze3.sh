#!/usr/bin/env bash
# The multi-turn demo on the CPU: a tiny random Qwen2.5-VL learns to walk 3x3 mazes from the images.
#   prepare -> validate -> SFT (answer format only) -> eval -> GRPO (4 moves, a new frame each, the last two
#   frames in context) -> eval -> check-drift split by turn, then a before/after table and the run's curves.
# Usage: scripts/demo-maze3.sh VLRL OUTDIR   (about 40 minutes on a 2-core laptop: see docs/demo.md)
set -euo pipefail
VLRL=${1:-vlrl}
OUT=${2:-demo-out}
PY=$(dirname "$VLRL")/python
rm -rf "$OUT/maze3" "$OUT/eval-maze3-sft" "$OUT/eval-maze3-grpo" runs/maze3-sft runs/maze3-grpo && mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
start=$(date +%s)

step "1. a tiny random Qwen2.5-VL (kept from make demo if it is there)"
[ -d "$OUT/tiny-qwen2_5_vl" ] || $VLRL tiny-model "$OUT/tiny-qwen2_5_vl" --family qwen2_5_vl

step "2. 3x3 mazes whose only route takes 4 moves, 4 moves allowed, 56-px cells, progress reward"
$VLRL prepare maze2d --out "$OUT/maze3" --rows 400 --val-rows 40 --maze-size 3 --min-moves 4 --max-moves 4 \
    --max-steps 4 --cell-px 56 --reward progress
$VLRL validate "$OUT/maze3/train.parquet" "$OUT/maze3/val.parquet" --processor "$OUT/tiny-qwen2_5_vl"

step "3. SFT on the answer format only (a random move as the target)"
$VLRL train recipes/maze3-tiny-sft.yaml
SFT=runs/maze3-sft/checkpoints/step_30/hf

step "4. eval after SFT (greedy, 40 held-out mazes, 4 moves, the last 2 frames in context)"
$VLRL eval "$SFT" "$OUT/maze3/val.parquet" --out "$OUT/eval-maze3-sft" --max-new-tokens 8 --history-images 2

step "5. GRPO, multi-turn (hf engine, ZeRO-2)"
$VLRL train recipes/maze3-tiny.yaml
GRPO=runs/maze3-grpo/checkpoints/$(cat runs/maze3-grpo/checkpoints/latest)/hf

step "6. eval after GRPO"
$VLRL eval "$GRPO" "$OUT/maze3/val.parquet" --out "$OUT/eval-maze3-grpo" --max-new-tokens 8 --history-images 2

step "7. check-drift on 4-move episodes, split by turn (hf engine in bf16 vs the fp32 trainer)"
$VLRL check-drift "$GRPO" "$OUT/maze3/val.parquet" --samples 16 --max-new-tokens 8 --history-images 2 \
    --engine-dtype bf16 --max-mean 0.05 --json "$OUT/drift-maze3.json"

step "before / after (held-out mazes, greedy)"
"$PY" "$(dirname "$0")/maze_demo_summary.py" "$OUT" maze3 "$(( $(date +%s) - start ))"
