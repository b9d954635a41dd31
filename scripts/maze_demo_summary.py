"""The maze demos' closing summary: before/after success, drift by turn, one held-out episode's frames as a
strip (replayed through the environment with the policy's own answers; the last frame is where it ended), and
the blind-policy baseline from prepare's manifest.

Usage: python scripts/maze_demo_summary.py OUT TAG SECONDS   (TAG: maze or maze3, the demo's data folder)
"""

import json
import sys

import pyarrow.parquet as pq
from PIL import Image

from vlrl_cli.data.images import image_from_uri
from vlrl_cli.rollout.envs.maze2d import Maze2dEnv

out, tag, secs = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [("after SFT (format only)", json.load(open(f"{out}/eval-{tag}-sft/metrics.json"))),
        ("after GRPO", json.load(open(f"{out}/eval-{tag}-grpo/metrics.json")))]
print(f"{'stage':<26}{'success':>10}{'format':>10}{'episodes':>10}")
for name, m in rows:
    print(f"{name:<26}{m['accuracy']:>10.3f}{m['format_rate']:>10.3f}{m['records']:>10}")
turns = json.load(open(f"{out}/drift-{tag}.json"))["stats"]["by_turn"]
print("drift by turn (mean abs log-prob diff, tokens):",
      ", ".join(f"{k} {v['abs_diff']['mean']:.2e} ({v['tokens']})" for k, v in turns.items() if v.get("tokens")))

rollouts = [json.loads(x) for x in open(f"{out}/eval-{tag}-grpo/rollouts.jsonl")]
ep = next((r for r in rollouts if r["correct"]), rollouts[0])
rec = next(r for r in pq.read_table(f"{out}/{tag}/val.parquet").to_pylist() if r["id"] == ep["record_id"])
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
strip.save(f"{out}/{tag}-episode.png")
print(f"{ep['record_id']}: " + " -> ".join(s["response"] for s in ep["steps"]) + f" (frames: {out}/{tag}-episode.png)")
maze = json.load(open(f"{out}/{tag}/manifest.json"))["summary"]
print(f"(a blind policy's best on these mazes is {maze['blind_policy_val_success']:.3f}; the held-out seeds come in "
      f"{maze['val']['distinct_layouts']} layouts, {maze['val_layouts_seen_in_train']} of them also among the training "
      f"mazes; demo wall time {secs} s)")
print(f"report with every episode's frames: {out}/eval-{tag}-grpo/report.html; curves: runs/{tag}-grpo/curves.png")
