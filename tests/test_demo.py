"""The CPU demo's promise, end to end: format-only SFT leaves held-out accuracy near chance, GRPO lifts it
to >= 85%, both as a full fine-tune and with LoRA adapters only (4 colours, tiny Qwen2.5-VL, ZeRO-2, hf engine).
Runs scripts/demo.sh as `make demo` does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_demo(tmp_path, script: str, timeout: int):
    """A demo script as `make` runs it, in a fresh folder that sees the repository's recipes."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    vlrl = Path(sys.executable).parent / "vlrl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / script), str(vlrl), "demo-out"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_demo_learns_colours(tmp_path):
    r = run_demo(tmp_path, "demo.sh", 1800)
    sft = json.loads((tmp_path / "demo-out" / "eval-sft" / "metrics.json").read_text())
    grpo = json.loads((tmp_path / "demo-out" / "eval-grpo" / "metrics.json").read_text())
    lora = json.loads((tmp_path / "demo-out" / "eval-grpo-lora" / "metrics.json").read_text())
    assert sft["format_rate"] > 0.9 and sft["accuracy"] <= 0.35, sft["accuracy"]
    assert grpo["accuracy"] >= 0.85, grpo["accuracy"]
    assert lora["accuracy"] >= 0.85, lora["accuracy"]
    assert "after GRPO" in r.stdout and "after GRPO with LoRA" in r.stdout
    # the LoRA run trained adapters only: its checkpoint holds a PEFT adapter beside the merged export
    step = (tmp_path / "runs" / "colors-grpo-lora" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "runs" / "colors-grpo-lora" / "checkpoints" / step / "adapter" / "adapter_config.json").exists()
    drift = json.loads((tmp_path / "demo-out" / "drift.json").read_text())
    assert all(c["passed"] is not False for c in drift["checks"] if c["severity"] == "error"), drift["checks"]
    assert (tmp_path / "demo-out" / "eval-grpo" / "report.html").exists()


@pytest.mark.slow
def test_demo_maze_learns_to_walk_the_mazes(tmp_path):
    """`make demo-maze`: 2x2 mazes (two shapes: a wall right of the start or below it), 2 moves (a blind
    policy's best is 0.5), a new image after every move.
    Format-only SFT leaves held-out success near 0; multi-turn GRPO must reach >= 0.8, and check-drift on
    2-turn episodes, split by turn, must pass on both turns."""
    r = run_demo(tmp_path, "demo-maze.sh", 1500)
    sft = json.loads((tmp_path / "demo-out" / "eval-maze-sft" / "metrics.json").read_text())
    grpo = json.loads((tmp_path / "demo-out" / "eval-maze-grpo" / "metrics.json").read_text())
    assert sft["format_rate"] > 0.9 and sft["accuracy"] <= 0.5, sft
    assert grpo["accuracy"] >= 0.8, grpo
    drift = json.loads((tmp_path / "demo-out" / "drift-maze.json").read_text())
    turns = drift["stats"]["by_turn"]
    assert turns["turn_1"]["tokens"] and turns["turn_2"]["tokens"]  # both turns were checked
    assert max(t["abs_diff"]["mean"] for t in turns.values()) < 0.05, turns
    assert "after GRPO" in r.stdout and "drift by turn" in r.stdout
    assert (tmp_path / "runs" / "maze-grpo" / "curves.png").exists()
    # the report shows held-out episodes frame by frame, each frame under the move that led to it
    html = (tmp_path / "demo-out" / "eval-maze-grpo" / "report.html").read_text()
    assert "after turn 1: Move:" in html
