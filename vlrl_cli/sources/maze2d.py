"""maze2d stub rows: the environment draws each maze itself (from the row's seed) at every step.

Validation rows use fixed seeds (the same for everyone, whatever --seed is) so evaluations compare;
training rows draw their seeds from --seed.
"""

from __future__ import annotations

import random
from typing import Iterator

from . import ConvertContext, Item, Source
from ..errors import UserError

ENV_CLASS = "maze2d"
VAL_SEED_BASE = 1_000_000  # validation seeds are VAL_SEED_BASE + i


def items(path: str | None, opts: dict) -> Iterator[Item]:
    size, max_steps = int(opts.get("maze_size", 5)), int(opts.get("max_steps", 20))
    if not 2 <= size <= 32:
        raise UserError(f"--maze-size must be between 2 and 32, got {size}")
    for i in range(int(opts.get("val_rows", 50))):
        yield Item(f"val/{i}", "val", {"seed": VAL_SEED_BASE + i, "size": size, "max_steps": max_steps})
    rng = random.Random(f"maze2d:{opts.get('seed', 0)}")
    for i in range(int(opts.get("rows", 1000))):
        seed = rng.randrange(VAL_SEED_BASE)  # never collides with a validation seed
        yield Item(f"train/{i}", "train", {"seed": seed, "size": size, "max_steps": max_steps})


def convert(item: Item, ctx: ConvertContext) -> tuple[dict, list]:
    p = item.payload
    text = (f"Maze episode (seed {p['seed']}, {p['size']}x{p['size']}): the maze2d environment renders "
            "the maze at reset and after every move.")
    record = {
        "data_source": "maze2d",
        "prompt": [{"role": "user", "content": [{"type": "text", "text": text}]}],
        "env_class": ENV_CLASS,
        "reward_spec": {"method": "env", "ground_truth": None},
        "extra_info": {"seed": p["seed"], "maze_size": p["size"], "max_steps": p["max_steps"]},
    }
    return record, []


SOURCE = Source("maze2d", items, convert, ("rows", "val_rows", "maze_size", "max_steps"))
