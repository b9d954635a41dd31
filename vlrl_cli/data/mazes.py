"""Maze2D worlds: a maze from a seed, drawn as an image. Pure functions of (seed, size, agent position),
shared by the data source that writes maze records (the prompt is the first frame) and the environment that
plays them (a new frame after every move).

The maze is a randomised depth-first search on a size x size grid. The agent starts top-left, the goal is
bottom-right.
"""

from __future__ import annotations

import random
import re

from PIL import Image, ImageDraw

from .images import canonicalize

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


def frame_part(maze, size: int, agent: tuple[int, int], cell: int) -> dict:
    """The maze with the agent at `agent` as a chat image part (a canonical PNG data URI)."""
    img = canonicalize(draw_maze(maze, size, agent, cell))
    return {"type": "image_url", "image_url": {"url": img.data_uri}}


def first_prompt(extra: dict) -> list[dict]:
    """The episode's first observation for a record's extra_info (seed, maze_size, cell_px)."""
    size = int(extra.get("maze_size", 5))
    maze = make_maze(int(extra.get("seed", 0)), size)
    part = frame_part(maze, size, (0, 0), int(extra.get("cell_px", 28)))
    return [{"role": "user", "content": [part, {"type": "text", "text": INSTRUCTION}]}]
