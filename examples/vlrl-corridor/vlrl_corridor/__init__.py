"""A complete user environment for vlrl: a corridor of cells drawn as an image, with a key and a door.

The agent (red) starts at the left; it must step onto the key (yellow), then reach the door (brown) at the
right end. Each turn the model answers `Move: left` or `Move: right` and sees a new frame. Reward: 1 for
opening the door with the key, 0.2 for holding the key when the moves run out, else 0: a reward of its own,
not just "reached the goal". Records carry the layout in extra_info (length, key, seed), so they come from any
source; `make_records` writes some.

    pip install -e examples/vlrl-corridor       # registers env_class "corridor" (pyproject's entry point)
    python -m vlrl_corridor data/corridor        # 200 training + 20 validation records
    vlrl validate data/corridor/*.jsonl
    vlrl eval MODEL data/corridor/val.jsonl --out evals/corridor
"""

from __future__ import annotations

import random
import re

from PIL import Image, ImageDraw

from vlrl_cli.data.images import canonicalize
from vlrl_cli.rollout.envs.base import Env, StepResult

MOVE = re.compile(r"move\s*:\s*(left|right)\b", re.I)
CELL = 32
INSTRUCTION = ("You are the red square. Pick up the yellow key, then walk to the brown door. "
               "Answer with one line: Move: left or Move: right.")


def draw(length: int, agent: int, key: int | None) -> Image.Image:
    img = Image.new("RGB", (CELL * length, CELL), "white")
    d = ImageDraw.Draw(img)
    for x in range(length):
        d.rectangle([x * CELL, 0, (x + 1) * CELL - 1, CELL - 1], outline="black", width=2)
    d.rectangle([(length - 1) * CELL + 6, 4, length * CELL - 7, CELL - 5], fill=(120, 70, 30))  # the door
    if key is not None:
        d.ellipse([key * CELL + 9, 9, key * CELL + CELL - 10, CELL - 10], fill=(235, 200, 20))
    d.rectangle([agent * CELL + 8, 8, agent * CELL + CELL - 9, CELL - 9], fill=(220, 30, 30))
    return img


def frame(length: int, agent: int, key: int | None) -> dict:
    return {"type": "image_url", "image_url": {"url": canonicalize(draw(length, agent, key)).data_uri}}


class Corridor(Env):
    @classmethod
    def turn_limit(cls, record: dict) -> int:
        return int((record.get("extra_info") or {}).get("max_steps", 12))

    def reset(self, record: dict) -> list[dict]:
        extra = record.get("extra_info") or {}
        self.record, self.turn = record, 0
        self.length, self.key, self.agent = int(extra["length"]), int(extra["key"]), 0
        self.max_turns, self.has_key = self.turn_limit(record), False
        return [{"role": "user", "content": [frame(self.length, self.agent, self.key), {"type": "text", "text": INSTRUCTION}]}]

    def step(self, text: str) -> StepResult:
        self.turn += 1
        found = MOVE.findall(text[-500:])  # model text is hostile: a bounded regex, never evaluated
        if found:
            self.agent = max(0, min(self.length - 1, self.agent + (1 if found[-1].lower() == "right" else -1)))
            if self.agent == self.key:
                self.has_key = True
        opened = self.has_key and self.agent == self.length - 1
        info = {"format_ok": bool(found), "correct": opened, "has_key": self.has_key}
        if opened or self.turn >= self.max_turns:
            reward = 1.0 if opened else 0.2 if self.has_key else 0.0
            return StepResult([], reward, True, {**info, "done_reason": "opened" if opened else "max_steps"})
        note = "You hold the key." if self.has_key else "No key yet."
        return StepResult([{"role": "user", "content": [frame(self.length, self.agent, None if self.has_key else self.key),
                                                        {"type": "text", "text": note}]}], 0.0, False, info)


def make_records(n: int, seed: int, split: str) -> list[dict]:
    """n records of corridors of 4-6 cells with the key somewhere between the ends; the prompt is the first
    frame, as the environment shows it (so validate counts real tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(4, 6)
        record = {"id": f"corridor-{split}-{i}", "data_source": "corridor", "env_class": "corridor",
                  "reward_spec": {"method": "env", "ground_truth": None},
                  "extra_info": {"length": length, "key": rng.randint(1, length - 2), "max_steps": 2 * length}}
        record["prompt"] = Corridor().reset(record)
        out.append(record)
    return out
