"""Maze2D worlds: a maze from a seed, drawn as an image. Pure functions of (seed, size, agent position),
shared by the data source that writes maze records (the prompt is the first frame) and the environment that
plays them (a new frame after every move).

The maze is a randomised depth-first search on a size x size grid: one route between any two cells (the
"hard" variant). The "easy" variant then opens some of the remaining inner walls, so several routes lead to
the goal. The agent starts top-left, the goal is bottom-right.
"""

from __future__ import annotations

import random
import re

from collections import deque
from itertools import product

from PIL import Image, ImageDraw

from .images import canonicalize

MOVES = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
MOVE_RE = re.compile(r"move\s*:\s*(up|down|left|right)\b", re.I)
INSTRUCTION = ("You are the red dot in the maze; reach the green square. Black lines are walls. "
               "Answer with exactly one line: Move: up, Move: down, Move: left or Move: right.")


VARIANTS = ("hard", "easy")
MAX_FRAME_PX = 4096  # a frame is maze_size x cell_px pixels a side: 64 cells of 512 px would be 32,768
OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}


def extra_openings(size: int, variant: str) -> int:
    """Inner walls the variant opens after the depth-first search: none for "hard" (one route), a third of the
    (size-1)^2 that a perfect maze keeps for "easy" (at least one)."""
    return 0 if variant == "hard" else max(1, (size - 1) ** 2 // 3)


def make_maze(seed: int, size: int, variant: str = "hard") -> dict[tuple[int, int], set[str]]:
    """Open passages per cell, by randomised depth-first search (every cell reachable, one path); the easy
    variant then opens extra inner walls with the same generator (so a seed names one maze per variant)."""
    if variant not in VARIANTS:
        raise ValueError(f"maze variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    rng = random.Random(seed)
    open_dirs: dict[tuple[int, int], set[str]] = {(x, y): set() for x in range(size) for y in range(size)}
    stack, seen = [(0, 0)], {(0, 0)}
    while stack:
        x, y = stack[-1]
        options = [(d, (x + dx, y + dy)) for d, (dx, dy) in MOVES.items()
                   if (x + dx, y + dy) in open_dirs and (x + dx, y + dy) not in seen]
        if not options:
            stack.pop()
            continue
        d, nxt = rng.choice(options)
        open_dirs[(x, y)].add(d)
        open_dirs[nxt].add(OPPOSITE[d])
        seen.add(nxt)
        stack.append(nxt)
    closed = [((x, y), d) for (x, y) in sorted(open_dirs) for d in ("right", "down")
              if (x + MOVES[d][0], y + MOVES[d][1]) in open_dirs and d not in open_dirs[(x, y)]]
    for (x, y), d in rng.sample(closed, min(len(closed), extra_openings(size, variant))):
        open_dirs[(x, y)].add(d)
        open_dirs[(x + MOVES[d][0], y + MOVES[d][1])].add(OPPOSITE[d])
    return open_dirs


def step(maze, cell: tuple[int, int], move: str) -> tuple[int, int]:
    """Where a move from `cell` leads (a wall: nowhere)."""
    if move not in maze[cell]:
        return cell
    return cell[0] + MOVES[move][0], cell[1] + MOVES[move][1]


def goal_distances(maze, size: int) -> dict[tuple[int, int], int]:
    """Moves from every cell to the goal (bottom-right), by breadth-first search."""
    goal = (size - 1, size - 1)
    dist, todo = {goal: 0}, deque([goal])
    while todo:
        cell = todo.popleft()
        for move in maze[cell]:
            nxt = step(maze, cell, move)
            if nxt not in dist:
                dist[nxt] = dist[cell] + 1
                todo.append(nxt)
    return dist


def shortest_moves(maze, size: int) -> list[str]:
    """One shortest move sequence from the start to the goal (the first direction in MOVES order at a tie)."""
    dist, cell, moves = goal_distances(maze, size), (0, 0), []
    while dist[cell]:
        move = next(m for m in MOVES if m in maze[cell] and dist[step(maze, cell, m)] == dist[cell] - 1)
        moves.append(move)
        cell = step(maze, cell, move)
    return moves


def solves(maze, size: int, moves) -> bool:
    """Whether a fixed move sequence reaches the goal (walls leave the agent in place; the goal ends it)."""
    cell, goal = (0, 0), (size - 1, size - 1)
    for move in moves:
        cell = step(maze, cell, move)
        if cell == goal:
            return True
    return cell == goal


EXACT_BLIND_MOVES = 7  # 4^7 sequences: exhaustive search stays about a second for 100 mazes


def blind_policy_score(mazes: list, size: int, max_steps: int) -> tuple[float, bool]:
    """The success rate of the best policy that ignores the images: the one fixed move sequence (of max_steps
    moves) that solves the most of these mazes. Exact up to EXACT_BLIND_MOVES moves; beyond, the best of the
    mazes' own shortest solutions (a lower bound). Returns (score, exact)."""
    if not mazes:
        return 0.0, True
    if max_steps <= EXACT_BLIND_MOVES:
        candidates, exact = product(MOVES, repeat=max_steps), True
    else:
        candidates, exact = {tuple(shortest_moves(m, size)) for m in mazes}, False
    best = max(sum(solves(m, size, seq) for m in mazes) for seq in candidates)
    return best / len(mazes), exact


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
    maze = make_maze(int(extra.get("seed", 0)), size, extra.get("variant", "hard"))
    part = frame_part(maze, size, (0, 0), int(extra.get("cell_px", 28)))
    return [{"role": "user", "content": [part, {"type": "text", "text": INSTRUCTION}]}]
