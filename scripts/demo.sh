#!/usr/bin/env bash
# The end-to-end demo on the CPU: a tiny random Qwen2.5-VL learns the synthetic colours task.
#   prepare -> validate -> SFT (answer format only) -> eval -> GRPO -> eval -> GRPO with LoRA -> eval -> check-drift,
#   then a before/after table.
# Usage: scripts/demo.sh VLRL OUTDIR
set -euo pipefail
VLRL=${1:-vlrl}
OUT=${2:-demo-out}
PY=$(dirname "$VLRL")/python
SAMPLE=../shared/data/geometry3k-sample
rm -rf "$OUT" runs/colors-sft runs/colors-grpo runs/colors-grpo-lora && mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
start=$(date +%s)

step "1. build a tiny random Qwen2.5-VL (real architecture, local tokenizer)"
$VLRL tiny-model "$OUT/tiny-qwen2_5_vl" --family qwen2_5_vl

step "2. prepare the synthetic colours task"
$VLRL prepare colors --out "$OUT/colors" --rows 1200 --num-colors 4 --image-size 84

step "3. validate it, counting prompt tokens with the model's processor"
$VLRL validate "$OUT/colors/train.parquet" "$OUT/colors/val.parquet" --processor "$OUT/tiny-qwen2_5_vl" --max-prompt-tokens 128

if [ -d "$SAMPLE" ]; then
  step "   (and the real Geometry3K sample, original layout)"
  $VLRL prepare geometry3k --path "$SAMPLE" --out "$OUT/geometry3k"
  $VLRL validate "$OUT/geometry3k/train.parquet" --processor "$OUT/tiny-qwen2_5_vl" --max-prompt-tokens 1024
fi

step "4. SFT on the answer format only (random colours as targets)"
$VLRL train recipes/colors-tiny-sft.yaml
SFT=runs/colors-sft/checkpoints/step_40/hf

step "5. eval after SFT (greedy, held-out)"
$VLRL eval "$SFT" "$OUT/colors/val.parquet" --out "$OUT/eval-sft" --max-new-tokens 4

step "6. GRPO (ZeRO-2 on the CPU, hf rollout engine)"
$VLRL train recipes/colors-tiny.yaml

step "7. eval after GRPO"
GRPO=runs/colors-grpo/checkpoints/$(cat runs/colors-grpo/checkpoints/latest)/hf
$VLRL eval "$GRPO" "$OUT/colors/val.parquet" --out "$OUT/eval-grpo" --max-new-tokens 4

step "8. GRPO again from the same SFT checkpoint, LoRA adapters only (rank 32, vision tower included)"
$VLRL train recipes/colors-tiny-lora.yaml
LORA=runs/colors-grpo-lora/checkpoints/$(cat runs/colors-grpo-lora/checkpoints/latest)/hf

step "9. eval after GRPO with LoRA (the checkpoint's merged export)"
$VLRL eval "$LORA" "$OUT/colors/val.parquet" --out "$OUT/eval-grpo-lora" --max-new-tokens 4

step "10. check-drift: does the rollout engine agree with the trainer? (hf engine in bf16 vs the fp32 trainer,
   then a weight update pushed through the training sync path and re-checked on seen and unseen images)"
$VLRL check-drift "$GRPO" "$OUT/colors/val.parquet" --samples 16 --max-new-tokens 8 --engine-dtype bf16 \
    --after-update --max-mean 0.05 --json "$OUT/drift.json" --plot "$OUT/drift.png"

step "before / after (held-out colours, greedy)"
"$PY" - "$OUT" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
out, secs = sys.argv[1], sys.argv[2]
rows = [("after SFT (format only)", json.load(open(f"{out}/eval-sft/metrics.json"))),
        ("after GRPO", json.load(open(f"{out}/eval-grpo/metrics.json"))),
        ("after GRPO with LoRA", json.load(open(f"{out}/eval-grpo-lora/metrics.json")))]
print(f"{'stage':<26}{'accuracy':>10}{'format':>10}{'records':>9}")
for name, m in rows:
    print(f"{name:<26}{m['accuracy']:>10.3f}{m['format_rate']:>10.3f}{m['records']:>9}")
print(f"(chance with 4 colours: 0.25; demo wall time {secs} s)")
print(f"report with every rollout and its image: {out}/eval-grpo/report.html; drift plot: {out}/drift.png")
PYEOF
