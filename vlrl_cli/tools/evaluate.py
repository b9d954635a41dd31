"""`vlrl eval`: rollouts in the training environments (same engines, same rollout path), scored.

Writes metrics.json (accuracy, reward_mean, pass@k, format_rate, turns_mean, each also by data_source
and env_class, plus the decoding settings and seed), rollouts.jsonl (every trajectory, turn by turn) and
report.html (report.py: images, turns, rewards, a correct/incorrect filter).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from math import comb
from pathlib import Path
from typing import Callable

from ..rollout.engines import Sampling
from .report import write_report
from ..train.runs import writing


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class EvalOptions:
    engine: str = "hf"
    n: int = 1
    sampling: Sampling = field(default_factory=lambda: Sampling(0.0, 1.0, 128, 0))  # greedy by default
    max_turns: int | None = None  # None: as many as the environment allows
    max_context_tokens: int = 8192  # the longest episode (and the vllm engine's max_model_len)
    limit: int | None = None
    dtype: str = "float32"
    max_images: int | None = None  # the image history's bound (rollout.history.max_images)


def summarize(trajs, n: int) -> dict:
    """Metrics over trajectories grouped per record (n samples each)."""
    by_record = defaultdict(list)
    for t in trajs:
        by_record[(t.group, t.record_id)].append(t)
    out = {
        "records": len(by_record),
        "samples": len(trajs),
        "accuracy": sum(bool(t.info.get("correct")) for t in trajs) / len(trajs),
        "reward_mean": sum(t.reward for t in trajs) / len(trajs),
        "format_rate": sum(bool(t.info.get("format_ok")) for t in trajs) / len(trajs),
        "turns_mean": sum(t.turns for t in trajs) / len(trajs),
        "env_errors": sum(t.done_reason == "env_error" for t in trajs),  # scored as failed; why: rollouts.jsonl
        "pass_at_k": {},
    }
    for k in range(1, n + 1):
        vals = [pass_at_k(len(ts), sum(bool(t.info.get("correct")) for t in ts), k) for ts in by_record.values()]
        out["pass_at_k"][str(k)] = sum(vals) / len(vals)
    if any("first_try_correct" in t.info for t in trajs):
        out["first_try_accuracy"] = sum(bool(t.info.get("first_try_correct")) for t in trajs) / len(trajs)
    return out


def run_eval(model: str, data: str, out: Path, opts: EvalOptions = EvalOptions(),
             env_registry: dict | None = None, progress: Callable[[int], None] | None = None, engine=None) -> dict:
    """engine: a ready engine instead of `opts.engine` (tests script one)."""
    from ..rollout.engines import make_engine
    from ..data.records import load_records
    from ..model.loading import load_processor
    from ..rollout.episodes import collect
    from ..train.runs import resolve_model

    model = resolve_model(model)
    records = load_records(data, opts.limit)
    processor = load_processor(model)
    from ..rollout.episodes import engine_limits

    engine = engine or make_engine(opts.engine, model, processor, dtype=opts.dtype, seed=opts.sampling.seed,
                                   limits=engine_limits(records, opts.max_context_tokens, opts.max_turns, env_registry,
                                                        opts.max_images))
    sampling = opts.sampling
    trajs = []
    for i in range(0, len(records), 16):  # chunks: progress, and bounded memory
        chunk = collect(engine, records[i:i + 16], processor, opts.n, sampling, opts.max_turns,
                        opts.max_context_tokens, env_registry, max_images=opts.max_images)
        for t in chunk:
            t.group += i
        trajs += chunk
        if progress:
            progress(min(i + 16, len(records)))
    metrics = summarize(trajs, opts.n)
    for key in ("data_source", "env_class"):
        groups = defaultdict(list)
        for t in trajs:
            groups[getattr(t, key)].append(t)
        metrics[f"by_{key}"] = {name: summarize(ts, opts.n) for name, ts in sorted(groups.items())}
    metrics["settings"] = {"model": model, "data": data, **{k: v for k, v in asdict(opts).items() if k != "sampling"},
                           **asdict(opts.sampling)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with writing(out, "eval's output"):  # a full disk names the folder
        write_eval_files(out, metrics, trajs, records)
    return metrics


EVAL_FILES = ("metrics.json", "rollouts.jsonl", "report.html")  # what an eval's --out folder holds


def write_eval_files(out: Path, metrics: dict, trajs, records) -> None:
    """metrics.json, rollouts.jsonl and report.html, each written whole under a temporary name and then
    renamed: a full disk or Ctrl-C leaves the previous files or none, never a truncated one."""
    names = EVAL_FILES
    try:
        (out / "metrics.json.partial").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(out / "rollouts.jsonl.partial", "w") as f:
            for t in trajs:
                f.write(json.dumps({"record_id": t.record_id, "sample": t.group, "env_class": t.env_class,
                                    "data_source": t.data_source, "reward": t.reward, "correct": bool(t.info.get("correct")),
                                    "turns": t.turns, "done_reason": t.done_reason, "prompt_tokens": t.prompt_len,
                                    "response_tokens": t.response_len, "steps": t.texts,
                                    **({"env_error": t.info["env_error"]} if t.done_reason == "env_error" else {})})
                        + "\n")
        write_report(out / "report.html.partial", metrics, trajs, {r.get("id", ""): r for r in records})
        for name in names:
            (out / f"{name}.partial").replace(out / name)
    finally:
        for name in names:
            (out / f"{name}.partial").unlink(missing_ok=True)
