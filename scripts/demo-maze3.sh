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
"$PY" - "$OUT" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
out, secs = sys.argv[1], sys.argv[2]
rows = [("after SFT (format only)", json.load(open(f"{out}/eval-maze3-sft/metrics.json"))),
        ("after GRPO", json.load(open(f"{out}/eval-maze3-grpo/metrics.json")))]
print(f"{'stage':<26}{'success':>10}{'format':>10}{'episodes':>10}")
for name, m in rows:
    print(f"{name:<26}{m['accuracy']:>10.3f}{m['format_rate']:>10.3f}{m['records']:>10}")
drift = json.load(open(f"{out}/drift-maze3.json"))
turns = drift["stats"]["by_turn"]
print("drift by turn (mean abs log-prob diff, tokens):",
      ", ".join(f"{k} {v['abs_diff']['mean']:.2e} ({v['tokens']})" for k, v in turns.items() if v.get("tokens")))
# one held-out episode's frames (the last one is where it ended), replayed through the environment with
# the policy's own answers
from PIL import Image
import pyarrow.parquet as pq
from vlrl_cli.rollout.envs.maze2d import Maze2dEnv
from vlrl_cli.data.images import image_from_uri
rollouts = [json.loads(x) for x in open(f"{out}/eval-maze3-grpo/rollouts.jsonl")]
ep = next((r for r in rollouts if r["correct"]), rollouts[0])
rec = next(r for r in pq.read_table(f"{out}/maze3/val.parquet").to_pylist() if r["id"] == ep["record_id"])
env = Maze2dEnv()
frames = [image_from_uri(env.reset(rec)[0]["content"][0]["image_url"]["url"])]
for s in ep["steps"]:
    obs = env.step(s["response"]).observation
    frames += [image_from_uri(p["image_url"]["url"]) for m in obs for p in m["content"] if p.get("type") == "image_url"]
strip = Image.new("RGB", (sum(f.width for f in frames) + 8 * (len(frames) - 1), frames[0].height), "white")
x = 0
for f in frames:
    strip.paste(f, (x, 0))
    x += f.width + 8
strip.save(f"{out}/maze3-episode.png")
print(f"{ep['record_id']}: " + " -> ".join(s["response"] for s in ep["steps"]) + f" (frames: {out}/maze3-episode.png)")
maze = json.load(open(f"{out}/maze3/manifest.json"))["summary"]
print(f"(a blind policy's best on these mazes is {maze['blind_policy_val_success']:.3f}; the held-out seeds come in "
      f"{maze['val']['distinct_layouts']} layouts, {maze['val_layouts_seen_in_train']} of them also among the training "
      f"mazes; demo wall time {secs} s)")
print(f"report with every episode's frames: {out}/eval-maze3-grpo/report.html; curves: runs/maze3-grpo/curves.png")
PYEOF
