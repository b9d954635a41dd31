"""Throughput of `vlrl prepare` and `vlrl validate`, side by side with the straightforward baseline.

Baseline: what peers' prep scripts do -- one process, `datasets.map` decoding each image with PIL,
re-encoding it as PNG (PIL defaults) and building the data-URI prompt, then `to_parquet`.
vlrl: `vlrl prepare` on the same input (canonical resize + PNG, worker processes, streamed shards).

Input: synthetic diagram-like images (lines, circles, labels on white, 300-640 px), stored as PNG bytes
in a parquet with an Image feature -- the Hugging Face layout of Geometry3K and most VQA datasets.

    python bench/prepare_validate.py [--images 2000] [--rss-images 10000]
    python bench/prepare_validate.py --png-only      # only the PNG size / speed table (seconds)

Writes bench/results/prepare_validate.json. The PNG table: size and encode time of the canonical PNG
(vlrl's OpenCV settings, as images.canonicalize encodes) against PIL's default PNG, on three kinds of
image: the real Geometry3K sample's diagrams, flat colours (the colours / maze tasks, GUI-like) and
photo-like images (smooth colour fields with sensor-like noise; no photo ships offline).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
VLRL = [sys.executable, "-m", "vlrl_cli"]


def diagram(rng: random.Random):
    from PIL import Image, ImageDraw

    w, h = rng.randint(300, 640), rng.randint(240, 480)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [(rng.randint(10, w - 10), rng.randint(10, h - 10)) for _ in range(rng.randint(3, 7))]
    for a, b in zip(pts, pts[1:] + pts[:1]):
        d.line([a, b], fill="black", width=2)
    for _ in range(rng.randint(0, 2)):
        x, y, r = rng.randint(40, w - 40), rng.randint(40, h - 40), rng.randint(15, 40)
        d.ellipse([x - r, y - r, x + r, y + r], outline="black", width=2)
    for p, label in zip(pts, "ABCDEFG"):
        d.text((p[0] + 4, p[1] - 12), label, fill="black")
    d.text((rng.randint(0, w - 60), rng.randint(0, h - 20)), f"{rng.randint(2, 99)}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_input(n: int, path: Path) -> None:
    import datasets

    rng = random.Random(0)
    images = [{"bytes": diagram(rng), "path": None} for _ in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                               "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "problem": [f"<image>Find x in figure {i}." for i in range(n)],
                                     "answer": [str(i % 97) for i in range(n)]}, features=feats)
    ds.to_parquet(str(path))


def baseline(src: Path, out: Path) -> None:
    """The straightforward single-process datasets.map pipeline (run in its own process, like vlrl)."""
    import datasets
    from PIL import Image

    def convert(row):
        img = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        text = row["problem"].replace("<image>", "")
        return {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                        {"type": "text", "text": text}]}],
                "env_class": "geometry3k", "reward_spec": {"method": "rule", "ground_truth": row["answer"]}}

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files=str(src), split="train",
                               cache_dir=str(WORK / "hf-cache")).cast_column("image", datasets.Image(decode=False))
    ds = ds.map(convert, remove_columns=ds.column_names)
    ds.to_parquet(str(out))


class PeakRSS:
    """Peak resident memory of a process and all its children, sampled every 50 ms."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil

        while not self._stop:
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop = True
        self.thread.join()
        return self.peak


def run_vlrl(args: list[str], env=None, cmd=VLRL) -> tuple[float, int]:
    """Wall seconds and peak RSS of one whole command run (start-up and imports included, for both sides)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rss = PeakRSS(p.pid)
    _, stderr = p.communicate()
    peak = rss.stop()
    if p.returncode not in (0, 1):
        raise RuntimeError(f"vlrl {' '.join(args)} failed:\n{stderr}")
    return time.perf_counter() - t, peak


def prepare_args(src: Path, out: Path) -> list[str]:
    return ["prepare", str(src), "--out", str(out), "--image-column", "image", "--question-column", "problem",
            "--answer-column", "answer", "--env-class", "geometry3k", "--split", "train=1", "--overwrite"]


def png_table() -> dict:
    """Bytes and encode ms per image, PIL default vs vlrl's encoder, on three kinds of image."""
    import glob

    import numpy as np
    from PIL import Image, ImageDraw

    from vlrl_cli.data.images import CanonicalSpec, canonicalize, fit_size

    rng = random.Random(0)
    nrng = np.random.default_rng(0)
    diagrams = []
    for f in sorted(glob.glob(str(ROOT.parent / "shared" / "data" / "geometry3k-sample" / "*" / "img_diagram.png"))):
        im = Image.open(f).convert("RGB")
        diagrams.append(im.resize(fit_size(*im.size), Image.BICUBIC))
    flat = []
    for _ in range(10):
        im = Image.new("RGB", (448, 448), tuple(rng.randint(0, 255) for _ in range(3)))
        ImageDraw.Draw(im).ellipse([100, 100, 300, 300], fill=tuple(rng.randint(0, 255) for _ in range(3)))
        flat.append(im)
    photos = []
    for _ in range(10):
        field = Image.fromarray((nrng.random((14, 14, 3)) * 255).astype(np.uint8)).resize((448, 448), Image.BICUBIC)
        noisy = np.asarray(field).astype(np.float64) + nrng.normal(0, 8, (448, 448, 3))
        photos.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))

    def pil_png(im):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    spec = CanonicalSpec()  # the images are already on the grid: canonicalize only encodes
    encoders = {"pil_default": pil_png, "vlrl": lambda im: canonicalize(im, spec).data}
    out = {}
    for kind, images in (("diagrams_geometry3k_sample", diagrams), ("flat_colours_448px", flat), ("photo_like_448px", photos)):
        row = {}
        for name, enc in encoders.items():
            enc(images[0])  # warm-up
            t = time.perf_counter()
            sizes = [len(enc(im)) for _ in range(3) for im in images]
            ms = (time.perf_counter() - t) / len(sizes) * 1000
            row[name] = {"kb_per_image": round(sum(sizes) / len(sizes) / 1024, 1), "ms_per_image": round(ms, 2)}
        row["size_vs_pil"] = round(row["vlrl"]["kb_per_image"] / row["pil_default"]["kb_per_image"], 2)
        row["speed_vs_pil"] = round(row["pil_default"]["ms_per_image"] / row["vlrl"]["ms_per_image"], 2)
        row["images"] = len(images)
        out[kind] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rss-images", type=int, default=10000)
    ap.add_argument("--baseline", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--png-only", action="store_true", help="only the PNG size / speed table")
    a = ap.parse_args()
    if a.baseline:
        return baseline(Path(a.baseline[0]), Path(a.baseline[1]))
    results = HERE / "results" / "prepare_validate.json"
    if a.png_only:
        result = json.loads(results.read_text()) if results.exists() else {}
        result["png_encoding"] = png_table()
        results.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["png_encoding"], indent=2))
        return
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    print("building inputs and running both pipelines (a few minutes) ...", file=sys.stderr)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(WORK / "hf")}
    os.environ.update(env)
    import datasets

    datasets.disable_progress_bars()

    src = WORK / "input.parquet"
    make_input(a.images, src)
    print(f"input: {a.images} diagram images, {src.stat().st_size / 1e6:.1f} MB", file=sys.stderr)

    base_s, base_rss = run_vlrl(["--baseline", str(src), str(WORK / "baseline.parquet")], env,
                                cmd=[sys.executable, str(Path(__file__).resolve())])
    prep_s, prep_rss = run_vlrl(prepare_args(src, WORK / "out"), env)
    data = WORK / "out" / "train.parquet"
    val_s, _ = run_vlrl(["validate", str(data)], env)
    # the tiny model's processor is a real Qwen2.5-VL processor: its cost is the same as a 3B/7B model's
    subprocess.run(VLRL + ["tiny-model", str(WORK / "tiny")], cwd=ROOT, env=env, check=True, capture_output=True)
    valp_s, _ = run_vlrl(["validate", str(data), "--processor", str(WORK / "tiny"), "--max-prompt-tokens", "8192"], env)

    rss_n = a.rss_images
    big = WORK / "input-big.parquet"
    make_input(rss_n, big)
    big_s, big_rss = run_vlrl(prepare_args(big, WORK / "out-big"), env)

    n = a.images
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "images": n,
        "prepare_images_per_s": round(n / prep_s, 1),
        "baseline_images_per_s": round(n / base_s, 1),
        "prepare_speedup_vs_baseline": round(base_s / prep_s, 2),
        "validate_rows_per_s": round(n / val_s, 1),
        "validate_rows_per_s_processor": round(n / valp_s, 1),
        "peak_rss_mb": round(big_rss / 2**20, 1),
        "peak_rss_images": rss_n,
        "prepare_images_per_s_at_peak_rss_run": round(rss_n / big_s, 1),
        "peak_rss_mb_small_run": round(prep_rss / 2**20, 1),
        "baseline_peak_rss_mb_small_run": round(base_rss / 2**20, 1),
        "notes": "wall time of whole CLI runs (start-up, imports and worker pools included); "
                 "peak RSS summed over the process and its workers",
        "png_encoding": png_table(),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "prepare_validate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
