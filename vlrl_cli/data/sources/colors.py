"""A synthetic task: an image of one coloured shape; the answer is its colour, from a fixed list.

Small enough for a CPU demo to learn in minutes, hard enough that a model must look at the pixels
(the prompt text is the same for every row). Each image is a function of (seed, index) alone.
"""

from __future__ import annotations

import random
from typing import Iterator

from PIL import Image, ImageDraw

from . import ConvertContext, Item, Source, canonical, image_part, text_part
from ...errors import UserError

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30),
    "purple": (130, 40, 170), "orange": (245, 140, 20), "cyan": (30, 200, 210), "pink": (240, 120, 180),
    "brown": (120, 70, 30), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
ENV_CLASS = "colors"


def question(colors: list[str]) -> str:
    return f"What colour is the shape in the image? Answer with one word: {', '.join(colors)}."


def draw(rng: random.Random, color: tuple[int, int, int], shape: str, size: int) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in color)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    return img


def color_names(opts: dict) -> list[str]:
    n = int(opts.get("num_colors", 4))
    if not 2 <= n <= len(COLORS):
        raise UserError(f"--num-colors must be between 2 and {len(COLORS)}, got {n}")
    return list(COLORS)[:n]


def items(path: str | None, opts: dict) -> Iterator[Item]:
    shapes = opts.get("shapes") or list(SHAPES)
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise UserError(f"unknown shapes {bad}; choose from {', '.join(SHAPES)}")
    names = color_names(opts)
    rows = int(opts.get("rows", 1000))
    # --val-rows: exactly that many validation rows besides the training rows; without it, the rows are split
    # by --split (a hash of each row's id)
    val_rows = opts.get("val_rows")
    split = None if val_rows is None else "train"
    for i in range(rows):
        yield Item(source_id=str(i), split=split, payload={"index": i, "colors": names, "shapes": shapes})
    for i in range(rows, rows + int(val_rows or 0)):
        yield Item(source_id=str(i), split="val", payload={"index": i, "colors": names, "shapes": shapes})


def convert(item: Item, ctx: ConvertContext) -> tuple[dict, list]:
    p = item.payload
    rng = random.Random(f"colors:{ctx.opts.get('seed', 0)}:{p['index']}")
    name = rng.choice(p["colors"])
    shape = rng.choice(p["shapes"])
    img = canonical(draw(rng, COLORS[name], shape, int(ctx.opts.get("image_size", 56))), ctx)
    record = {
        "data_source": "colors",
        "prompt": [{"role": "user", "content": [image_part(img), text_part(question(p["colors"]))]}],
        "env_class": ENV_CLASS,
        "reward_spec": {"method": "rule", "ground_truth": name},
        "extra_info": {"shape": shape, "colors": p["colors"], "image_sha256": [img.sha256]},
    }
    return record, [img]


SOURCE = Source("colors", items, convert, ("rows", "val_rows", "num_colors", "shapes", "image_size"))
