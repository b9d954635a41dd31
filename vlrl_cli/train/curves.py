"""curves.png: a run's metrics.jsonl as the plots people look at first, written when a run ends or stops."""

from __future__ import annotations

import json
import os
from pathlib import Path

# (title, [(metric, label)], log scale): a panel is drawn when any of its metrics has a value
PANELS = [
    ("reward and accuracy (training rollouts)", [("reward_mean", "reward"), ("accuracy", "accuracy")], False),
    ("validation accuracy", [("val_accuracy", "val accuracy")], False),
    ("SFT loss", [("loss", "loss")], False),
    ("engine vs trainer log-prob drift", [("drift_abs_mean", "mean"), ("drift_abs_max", "max")], True),
    ("entropy of sampled tokens", [("entropy", "entropy")], False),
]
PHASES = [("time_generate_s", "generate"), ("time_score_s", "score"), ("time_train_s", "train"), ("time_sync_s", "sync")]


def read_rows(metrics: Path) -> list[dict]:
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: plot the rest
            continue
    return rows


def write_curves(run_dir: str | Path) -> Path | None:
    """Plot run_dir/metrics.jsonl into run_dir/curves.png (atomically); None when there is nothing to plot."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [r for r in read_rows(metrics) if isinstance(r.get("step"), int)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [(t, [(k, lab) for k, lab in ms if series(k)[0]], log) for t, ms, log in PANELS]
    panels = [p for p in panels if p[1]]
    has_phases = any(series(k)[0] for k, _ in PHASES)
    n = len(panels) + has_phases
    cols = 2 if n > 1 else 1
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6 * cols, 3.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    flat = list(axes.flat)
    for ax, (title, ms, log) in zip(flat, panels):
        for key, label in ms:
            xs, ys = series(key)
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        if log and all(v > 0 for k, _ in ms for v in series(k)[1]):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if len(ms) > 1:
            ax.legend(fontsize=8)
    if has_phases:
        ax = flat[len(panels)]
        steps = [r["step"] for r in rows]
        bottom = [0.0] * len(rows)
        for key, label in PHASES:
            vals = [float(r.get(key) or 0.0) for r in rows]
            ax.bar(steps, vals, bottom=bottom, label=label, width=0.9)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title("step time by phase (s)", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: {len(rows)} steps", fontsize=11)
    fig.tight_layout()
    out = run_dir / "curves.png"
    tmp = run_dir / f".curves.{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=90)
        tmp.replace(out)
    finally:  # a full disk: no empty .curves file left beside the run
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
