"""maze2d rows: the environment draws each maze itself (from the row's seed) at every step.

A row's prompt is the episode's first observation (the maze image and the instruction, exactly what the
environment's reset shows), so `validate` counts real prompt tokens and a format-only SFT warm-up
(`sft_target: random_choice` over extra_info.choices, the four move lines) trains on real maze images.
Validation rows use fixed seeds (the same for everyone, whatever --seed is) so evaluations compare;
training rows draw their seeds from --seed. --min-moves/--max-moves keep only mazes whose shortest route
has that many moves (the first seeds in order that qualify, so validation seeds stay fixed).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterator

from . import ConvertContext, Item, Source
from ..mazes import MOVES, VARIANTS, blind_policy_score, first_prompt, goal_distances, make_maze
from ...errors import UserError

ENV_CLASS = "maze2d"
VAL_SEED_BASE = 1_000_000  # validation seeds are the first that qualify from VAL_SEED_BASE on
TRIES_PER_ROW = 2000  # a filter that keeps fewer mazes than this fraction is named as the problem


def settings(opts: dict) -> dict:
    """The options with their defaults, checked (UserError naming the flag)."""
    s = {"size": int(opts.get("maze_size", 5)), "max_steps": int(opts.get("max_steps", 20)),
         "cell_px": int(opts.get("cell_px", 28)), "variant": opts.get("variant", "hard"),
         "reward": opts.get("reward", "goal"), "min_moves": opts.get("min_moves"), "max_moves": opts.get("max_moves")}
    if not 2 <= s["size"] <= 32:
        raise UserError(f"--maze-size must be between 2 and 32, got {s['size']}")
    if not 8 <= s["cell_px"] <= 128:
        raise UserError(f"--cell-px must be between 8 and 128, got {s['cell_px']}")
    if s["variant"] not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)}, got {s['variant']!r}")
    if s["reward"] not in ("goal", "progress"):
        raise UserError(f"--reward must be goal or progress, got {s['reward']!r}")
    lo, hi = s["min_moves"], s["max_moves"]
    if lo is not None and hi is not None and lo > hi:
        raise UserError(f"--min-moves {lo} is above --max-moves {hi}")
    if lo is not None and lo > s["max_steps"]:
        raise UserError(f"--min-moves {lo} is above --max-steps {s['max_steps']}: no kept maze could be solved")
    return s


def qualifies(seed: int, s: dict) -> bool:
    if s["min_moves"] is None and s["max_moves"] is None:
        return True
    moves = goal_distances(make_maze(seed, s["size"], s["variant"]), s["size"])[(0, 0)]
    return (s["min_moves"] or 0) <= moves <= (s["max_moves"] or moves)


def seeds(s: dict, split: str, rows: int, seed: int) -> Iterator[int]:
    """The split's maze seeds: validation from VAL_SEED_BASE in order, training drawn from --seed below it."""
    rng = random.Random(f"maze2d:{seed}")
    found = tries = 0
    candidate = VAL_SEED_BASE - 1
    while found < rows:
        tries += 1
        if tries > TRIES_PER_ROW * (found + 1):
            raise UserError(f"--min-moves/--max-moves: almost no {s['size']}x{s['size']} {s['variant']} maze has a "
                            f"shortest route of {s['min_moves'] or 0}-{s['max_moves'] or 'any'} moves "
                            f"({found} in {tries} seeds); widen the range")
        candidate = candidate + 1 if split == "val" else rng.randrange(VAL_SEED_BASE)  # never a validation seed
        if qualifies(candidate, s):
            found += 1
            yield candidate


def items(path: str | None, opts: dict) -> Iterator[Item]:
    # not a generator: a bad option or an empty filter is named before prepare touches the output folder
    s = settings(opts)
    val = list(seeds(s, "val", int(opts.get("val_rows", 50)), 0))
    train = list(seeds(s, "train", int(opts.get("rows", 1000)), opts.get("seed", 0)))
    return iter([Item(f"val/{i}", "val", {"seed": x, **s}) for i, x in enumerate(val)]
                + [Item(f"train/{i}", "train", {"seed": x, **s}) for i, x in enumerate(train)])


def convert(item: Item, ctx: ConvertContext) -> tuple[dict, list]:
    p = item.payload
    maze = make_maze(p["seed"], p["size"], p.get("variant", "hard"))
    extra = {"seed": p["seed"], "maze_size": p["size"], "max_steps": p["max_steps"],
             "cell_px": p.get("cell_px", 28), "choices": [f"Move: {m}" for m in MOVES],
             "shortest_moves": goal_distances(maze, p["size"])[(0, 0)]}
    for key, default in (("variant", "hard"), ("reward", "goal")):  # written only when not the default
        if p.get(key, default) != default:
            extra[key] = p[key]
    record = {"data_source": "maze2d", "env_class": ENV_CLASS,
              "reward_spec": {"method": "env", "ground_truth": None}, "extra_info": extra}
    record["prompt"] = first_prompt(extra)  # the first frame, as the environment shows it
    return record, []


def layout(maze) -> tuple:
    return tuple(sorted((cell, tuple(sorted(dirs))) for cell, dirs in maze.items()))


def summary(opts: dict) -> dict:
    """What the mazes are like, for the manifest: shortest routes, distinct layouts (and how many validation
    layouts also occur in training), and what a blind policy (one fixed move sequence) scores on validation."""
    s = settings(opts)
    out = {"variant": s["variant"], "reward": s["reward"]}
    layouts = {}
    for split, rows, seed in (("val", int(opts.get("val_rows", 50)), 0), ("train", int(opts.get("rows", 1000)),
                                                                          opts.get("seed", 0))):
        mazes = [make_maze(x, s["size"], s["variant"]) for x in seeds(s, split, rows, seed)]
        moves = Counter(goal_distances(m, s["size"])[(0, 0)] for m in mazes)
        layouts[split] = {layout(m) for m in mazes}
        out[split] = {"rows": len(mazes), "shortest_moves": dict(sorted(moves.items())),
                      "distinct_layouts": len(layouts[split])}
        if split == "val":
            score, exact = blind_policy_score(mazes, s["size"], s["max_steps"])
            out["blind_policy_val_success"] = round(score, 4)
            out["blind_policy_exact"] = exact
    out["val_layouts_seen_in_train"] = len(layouts["val"] & layouts["train"])
    return out


SOURCE = Source("maze2d", items, convert,
                ("rows", "val_rows", "maze_size", "max_steps", "cell_px", "variant", "min_moves", "max_moves", "reward"),
                summary=summary)
