"""maze2d rows: the environment draws each maze itself (from the row's seed) at every step.

A row's prompt is the episode's first observation (the maze image and the instruction, exactly what the
environment's reset shows), so `validate` counts real prompt tokens and a format-only SFT warm-up
(`sft_target: random_choice` over extra_info.choices, the four move lines) trains on real maze images.
Validation rows use fixed seeds (the same for everyone, whatever --seed is) so evaluations compare;
training rows draw their seeds from --seed.
"""

from __future__ import annotations

import random
from typing import Iterator

from . import ConvertContext, Item, Source
from ..mazes import MOVES, first_prompt
from ...errors import UserError

ENV_CLASS = "maze2d"
VAL_SEED_BASE = 1_000_000  # validation seeds are VAL_SEED_BASE + i


def items(path: str | None, opts: dict) -> Iterator[Item]:
    size, max_steps = int(opts.get("maze_size", 5)), int(opts.get("max_steps", 20))
    cell = int(opts.get("cell_px", 28))
    if not 2 <= size <= 32:
        raise UserError(f"--maze-size must be between 2 and 32, got {size}")
    if not 8 <= cell <= 128:
        raise UserError(f"--cell-px must be between 8 and 128, got {cell}")
    common = {"size": size, "max_steps": max_steps, "cell_px": cell}
    for i in range(int(opts.get("val_rows", 50))):
        yield Item(f"val/{i}", "val", {"seed": VAL_SEED_BASE + i, **common})
    rng = random.Random(f"maze2d:{opts.get('seed', 0)}")
    for i in range(int(opts.get("rows", 1000))):
        seed = rng.randrange(VAL_SEED_BASE)  # never collides with a validation seed
        yield Item(f"train/{i}", "train", {"seed": seed, **common})


def convert(item: Item, ctx: ConvertContext) -> tuple[dict, list]:
    p = item.payload
    record = {
        "data_source": "maze2d",
        "env_class": ENV_CLASS,
        "reward_spec": {"method": "env", "ground_truth": None},
        "extra_info": {"seed": p["seed"], "maze_size": p["size"], "max_steps": p["max_steps"],
                       "cell_px": p.get("cell_px", 28), "choices": [f"Move: {m}" for m in MOVES]},
    }
    record["prompt"] = first_prompt(record["extra_info"])  # the first frame, as the environment shows it
    return record, []


SOURCE = Source("maze2d", items, convert, ("rows", "val_rows", "maze_size", "max_steps", "cell_px"))
