"""Offline stand-ins for what the unmodified tinker-cookbook recipes download (tests/test_serve.py).

    python offline_setup.py WORKDIR TINY_MODEL HUB_NAME

Writes under WORKDIR:
  dpdl-benchmark/caltech101/data/{train,test}-*.parquet  vlm_classifier's dataset (an Image and a ClassLabel
                                                         column): three classes of coloured shapes
  openai/gsm8k/{README.md, main/train-*.parquet}          rl_loop's dataset: questions whose answers are 7 or 8
  hf/hub/models--<HUB_NAME>/...                           TINY_MODEL's tokenizer cached under HUB_NAME (rl_loop
                                                         picks its renderer by a hub name; HF_HOME=WORKDIR/hf)
Runs in the client's venv (datasets, pillow); no network.
"""

import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["red_circle", "green_square", "blue_triangle"]


def shape_image(k: int, rng) -> Image.Image:
    im = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(im)
    colour, o = ["red", "green", "blue"][k], int(rng.integers(4, 16))
    if k == 0:
        d.ellipse([o, o, 64 - o, 64 - o], fill=colour)
    elif k == 1:
        d.rectangle([o, o, 64 - o, 64 - o], fill=colour)
    else:
        d.polygon([(32, o), (o, 64 - o), (64 - o, 64 - o)], fill=colour)
    return im


def caltech_like(root: Path) -> None:
    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    for split, n in (("train", 60), ("test", 12)):
        labels = [k % 3 for k in range(n)]
        ds = datasets.Dataset.from_dict({"image": [shape_image(k, rng) for k in labels], "label": labels}, features=feats)
        ds.to_parquet(str(root / "dpdl-benchmark/caltech101/data" / f"{split}-00000-of-00001.parquet"))


def gsm8k_like(root: Path) -> None:
    d = root / "openai/gsm8k"
    (d / "main").mkdir(parents=True, exist_ok=True)
    (d / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                 "    path: main/train-*.parquet\n---\n")
    rows = [{"question": f"Tom has {a} apples and gets {7 + (i % 2) - a} more. How many apples does he have?",
             "answer": f"{a} + {7 + (i % 2) - a} = {7 + i % 2}\n#### {7 + i % 2}"} for i, a in enumerate(range(1, 7))]
    datasets.Dataset.from_list(rows * 4).to_parquet(str(d / "main/train-00000-of-00001.parquet"))


def cached_tokenizer(root: Path, model: Path, hub_name: str) -> None:
    repo = root / "hf/hub" / ("models--" + hub_name.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs/main").write_text("0" * 40)


if __name__ == "__main__":
    root, model, hub = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    caltech_like(root)
    gsm8k_like(root)
    cached_tokenizer(root, model, hub)
