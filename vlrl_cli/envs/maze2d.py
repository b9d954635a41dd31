"""maze2d: a procedural maze drawn with PIL; the agent sees a new image after every move.

The maze is a function of the row's seed (randomised depth-first search on a size x size grid). The
agent starts top-left, the goal is bottom-right. Each turn the model answers `Move: up|down|left|right`
(the last such line counts); a wall or a malformed answer leaves the agent in place. Reward 1 on reaching
the goal, else 0 when max_steps run out.
"""

from __future__ import annotations

import random
import re

from PIL import Image, ImageDraw

from ..images import canonicalize
from .base import Env, StepResult

MOVES = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
MOVE_RE = re.compile(r"move\s*:\s*(up|down|left|right)\b", re.I)
INSTRUCTION = ("You are the red dot in the maze; reach the green square. Black lines are walls. "
               "Answer with exactly one line: Move: up, Move: down, Move: left or Move: right.")


def make_maze(seed: int, size: int) -> dict[tuple[int, int], set[str]]:
    """Open passages per cell, by randomised depth-first search (every cell reachable, one path)."""
    rng = random.Random(seed)
    open_dirs: dict[tuple[int, int], set[str]] = {(x, y): set() for x in range(size) for y in range(size)}
    stack, seen = [(0, 0)], {(0, 0)}
    opposite = {"up": "down", "down": "up", "left": "right", "right": "left"}
    while stack:
        x, y = stack[-1]
        options = [(d, (x + dx, y + dy)) for d, (dx, dy) in MOVES.items()
                   if (x + dx, y + dy) in open_dirs and (x + dx, y + dy) not in seen]
        if not options:
            stack.pop()
            continue
        d, nxt = rng.choice(options)
        open_dirs[(x, y)].add(d)
        open_dirs[nxt].add(opposite[d])
        seen.add(nxt)
        stack.append(nxt)
    return open_dirs


def draw_maze(maze, size: int, agent: tuple[int, int], cell: int = 28) -> Image.Image:
    img = Image.new("RGB", (size * cell, size * cell), "white")
    wall = max(2, cell // 8)  # thick enough to survive the resize to the vision grid at any cell size
    d = ImageDraw.Draw(img)
    gx, gy = size - 1, size - 1
    d.rectangle([gx * cell + 4, gy * cell + 4, gx * cell + cell - 5, gy * cell + cell - 5], fill=(30, 170, 40))
    ax, ay = agent
    d.ellipse([ax * cell + 6, ay * cell + 6, ax * cell + cell - 7, ay * cell + cell - 7], fill=(220, 30, 30))
    for (x, y), dirs in maze.items():
        x0, y0, x1, y1 = x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1
        if "up" not in dirs:
            d.line([x0, y0, x1, y0], fill="black", width=wall)
        if "down" not in dirs:
            d.line([x0, y1, x1, y1], fill="black", width=wall)
        if "left" not in dirs:
            d.line([x0, y0, x0, y1], fill="black", width=wall)
        if "right" not in dirs:
            d.line([x1, y0, x1, y1], fill="black", width=wall)
    return img


class Maze2dEnv(Env):
    def reset(self, record: dict) -> list[dict]:
        self.record = record
        extra = record.get("extra_info") or {}
        self.seed, self.size = int(extra.get("seed", 0)), int(extra.get("maze_size", 5))
        self.max_turns = int(extra.get("max_steps", 20))
        self.cell = int(extra.get("cell_px", 28))
        self.maze = make_maze(self.seed, self.size)
        self.agent, self.turn = (0, 0), 0
        return [{"role": "user", "content": [self._image_part(), {"type": "text", "text": INSTRUCTION}]}]

    def _image_part(self) -> dict:
        img = canonicalize(draw_maze(self.maze, self.size, self.agent, self.cell))
        return {"type": "image_url", "image_url": {"url": img.data_uri}}

    def step(self, text: str) -> StepResult:
        self.turn += 1
        found = MOVE_RE.findall(text[-500:])
        info = {"format_ok": bool(found)}
        if found:
            move = found[-1].lower()
            if move in self.maze[self.agent]:
                dx, dy = MOVES[move]
                self.agent = (self.agent[0] + dx, self.agent[1] + dy)
                note = f"You moved {move}."
            else:
                note = f"A wall blocks {move}; you stay."
        else:
            note = "No valid move found; answer with one line like Move: up."
        reached = self.agent == (self.size - 1, self.size - 1)
        info.update(correct=reached, position=list(self.agent))
        if reached or self.turn >= self.max_turns:
            return StepResult([], float(reached), True, {**info, "done_reason": "goal" if reached else "max_steps"})
        return StepResult([{"role": "user", "content": [self._image_part(), {"type": "text", "text": note}]}],
                          0.0, False, info)
