"""examples/tinker_colors_rl.py: image RL through the Tinker SDK against `vlrl serve` learns the colours task
(held-out accuracy >= 0.85 from a format-only start, as the CPU demo does with `vlrl train`). RL ends at the first
held-out check of 0.9 or more (every 10 steps); seeds 0-2 got there at steps 40-60."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
KEY = "tml-colors-example-key"


def test_grpo_with_image_chunks_through_the_sdk_learns_the_colours(tmp_path):
    from vlrl_cli.data.prepare import PrepareOptions, prepare
    from vlrl_cli.model.tiny import build_tiny_model

    from test_serve import serve_subprocess

    model = build_tiny_model(tmp_path / "tiny-qwen2_5_vl", "qwen2_5_vl")
    prepare(PrepareOptions(source="colors", out=tmp_path / "colors", workers=1,
                           source_opts={"rows": 1200, "num_colors": 4, "image_size": 84}))
    server, url = serve_subprocess(model, tmp_path / "state", tmp_path / "server.log", KEY)
    try:
        p = subprocess.run([sys.executable, str(ROOT / "examples/tinker_colors_rl.py"), "--base-url", url,
                            "--model", str(model), "--data", str(tmp_path / "colors"),
                            "--out", str(tmp_path / "out.json"), "--stop-at", "0.9"],
                           env={**os.environ, "TINKER_API_KEY": KEY, "TINKER_TELEMETRY": "0"},
                           capture_output=True, text=True, timeout=1500)
        assert p.returncode == 0, p.stderr[-4000:] + (tmp_path / "server.log").read_text()[-3000:]
    finally:
        server.terminate()
        server.wait(30)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["accuracy_after_format_sft"] < 0.6, out  # the start knows the format, not the colours
    assert out["accuracy_after_rl"] >= 0.85, out
    events = [json.loads(line) for line in (tmp_path / "state/requests.jsonl").read_text().splitlines()]
    rl = [e for e in events if e["op"] == "forward_backward" and e["loss_fn"] == "importance_sampling"]
    assert len(rl) > 10 and all(e["images"] == e["datums"] for e in rl)  # one image chunk per datum
    ref = [e for e in events if e["op"] == "forward"]  # the KL reference's log-probs: one forward pass a step
    assert len(ref) == len(rl) and [e["datums"] for e in ref] == [e["datums"] for e in rl]
