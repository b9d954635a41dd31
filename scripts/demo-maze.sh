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
"$PY" - "$OUT" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
out, secs = sys.argv[1], sys.argv[2]
rows = [("after SFT (format only)", json.load(open(f"{out}/eval-maze-sft/metrics.json"))),
        ("after GRPO", json.load(open(f"{out}/eval-maze-grpo/metrics.json")))]
print(f"{'stage':<26}{'success':>10}{'format':>10}{'episodes':>10}")
for name, m in rows:
    print(f"{name:<26}{m['accuracy']:>10.3f}{m['format_rate']:>10.3f}{m['records']:>10}")
drift = json.load(open(f"{out}/drift-maze.json"))
turns = drift["stats"]["by_turn"]
print("drift by turn (mean abs log-prob diff, tokens):",
      ", ".join(f"{k} {v['abs_diff']['mean']:.2e} ({v['tokens']})" for k, v in turns.items() if v.get("tokens")))
# one held-out episode's frames (the last one is where it ended), replayed through the environment with
# the policy's own answers
from PIL import Image
import pyarrow.parquet as pq
from vlrl_cli.rollout.envs.maze2d import Maze2dEnv
from vlrl_cli.data.images import image_from_uri
rollouts = [json.loads(x) for x in open(f"{out}/eval-maze-grpo/rollouts.jsonl")]
ep = next((r for r in rollouts if r["steps"][0]["response"].endswith("right")), rollouts[0])
rec = next(r for r in pq.read_table(f"{out}/maze/val.parquet").to_pylist() if r["id"] == ep["record_id"])
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
strip.save(f"{out}/maze-episode.png")
print(f"{ep['record_id']}: " + " -> ".join(s["response"] for s in ep["steps"]) + f" (frames: {out}/maze-episode.png)")
print(f"(a blind policy's best is 0.5; demo wall time {secs} s)")
print(f"report with every episode's frames: {out}/eval-maze-grpo/report.html; curves: runs/maze-grpo/curves.png")
PYEOF
