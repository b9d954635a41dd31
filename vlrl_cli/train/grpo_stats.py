"""The GRPO step's bookkeeping, kept out of the loop: phase timings, the trainer's GPU memory (apart from the
rollout engine's pool), per-token statistics summed over micro-batches, and the step's metrics over all ranks.
Every key it emits is documented in docs/metrics.md (a test checks both ways)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .distributed import all_ranks


def _gpu() -> bool:
    return torch.cuda.is_available()


@dataclass
class StepStats:
    """One step's numbers on this rank; `metrics()` combines them over all ranks."""

    engine_bytes: int  # the rollout engine's pool, which PyTorch's allocator keeps counting while it sleeps
    t0: float = field(default_factory=time.perf_counter)
    times: dict = field(default_factory=dict)  # phase -> seconds
    sums: dict = field(default_factory=lambda: dict.fromkeys(
        ("clip", "kl", "ent", "epoch_tok", "drift_sum", "ratio_sum", "tok"), 0.0))
    drift_max: float = 0.0
    held_gb: float | None = None  # what the trainer holds while the engine generates

    def __post_init__(self):
        if _gpu():
            self.held_gb = (torch.cuda.memory_allocated() - self.engine_bytes) / 1e9

    def phase(self, name: str, since: float) -> float:
        """Record `name` as the time from `since` to now; returns now (the next phase's start)."""
        now = time.perf_counter()
        self.times[name] = now - since
        return now

    def training_starts(self) -> None:
        if _gpu():  # from here to the sync: the trainer's phases
            torch.cuda.reset_peak_memory_stats()

    def sampled(self, anchor_logp, engine_logp, mask) -> None:
        """Statistics of the policy as it sampled (the anchor, before any update): once per micro-batch."""
        d = (anchor_logp - engine_logp).abs() * mask
        self.sums["drift_sum"] += float(d.sum())
        self.drift_max = max(self.drift_max, float(d.max()))
        self.sums["ratio_sum"] += float((torch.exp(anchor_logp - engine_logp) * mask).sum())
        self.sums["tok"] += float(mask.sum())

    def updated(self, train_logp, clip_flags, kl, mask) -> None:
        """Statistics that depend on the epoch (clipping, KL, entropy of the current policy): every micro-batch
        of every epoch, so they average over all of the step's updates."""
        self.sums["clip"] += float(clip_flags.sum())
        self.sums["ent"] += float((-train_logp.detach() * mask).sum())  # sampled-token entropy estimate
        self.sums["kl"] += float((kl.detach() * mask).sum()) if kl is not None else 0.0
        self.sums["epoch_tok"] += float(mask.sum())

    def metrics(self, step: int, trajs, keep, mbs, n_trained: int, n_groups_per: int, has_ref: bool, world: int,
                grad_norm, lr: float, gen_times: dict) -> dict:
        step_s = time.perf_counter() - self.t0
        g = all_ranks({
            **self.sums,
            "seqs": len(trajs), "reward": sum(t.reward for t in trajs), "correct": sum(bool(t.info.get("correct")) for t in trajs),
            "format": sum(bool(t.info.get("format_ok")) for t in trajs), "gen_tokens": sum(t.response_len for t in trajs),
            "prompt_tokens": sum(t.prompt_len for t in trajs), "groups_kept": int(keep.sum()) // n_groups_per,
            "too_long": sum(t.done_reason == "prompt_too_long" for t in trajs) // n_groups_per,
            "env_errors": sum(t.done_reason == "env_error" for t in trajs),
            "pad": sum(b.positions[1] - b.positions[0] for b in mbs), "computed": sum(b.positions[1] for b in mbs)})
        drift_max = all_ranks({"m": self.drift_max}, op="max")["m"]
        tok, epoch_tok, seqs = max(g["tok"], 1.0), max(g["epoch_tok"], 1.0), g["seqs"]
        out = {
            "step": step,
            "reward_mean": g["reward"] / seqs,
            "accuracy": g["correct"] / seqs,
            "format_rate": g["format"] / seqs,
            "response_len_mean": g["gen_tokens"] / seqs,
            "entropy": g["ent"] / epoch_tok,
            "kl": g["kl"] / epoch_tok if has_ref else None,
            "clip_frac": g["clip"] / epoch_tok,
            "grad_norm": grad_norm,
            "drift_abs_mean": g["drift_sum"] / tok,
            "drift_abs_max": drift_max,
            "is_ratio_mean": g["ratio_sum"] / tok,
            "groups_kept": int(g["groups_kept"]),
            "trained_sequences": n_trained,
            "prompts_too_long": int(g["too_long"]),
            "env_errors": int(g["env_errors"]),  # episodes whose environment failed (env_errors.jsonl)
            "time_generate_s": round(self.times["generate"], 4),
            # its parts: the engine's generate calls, waking it and putting it to sleep; the rest is environments,
            # rewards, observations and any wait for the render thread (the prompts are rendered during training)
            "time_generate_engine_s": round(gen_times["engine_s"], 4),
            "time_generate_wake_s": round(gen_times["wake_s"], 4),
            "time_generate_sleep_s": round(gen_times["sleep_s"], 4),
            "time_score_s": round(self.times["score"], 4),
            "time_train_s": round(self.times["train"], 4),
            "time_sync_s": round(self.times["sync"], 4),
            "tokens_per_s": g["gen_tokens"] / world / step_s,  # generated tokens per second per rank
            "time_step_s": round(step_s, 4),
            "prompt_len_mean": g["prompt_tokens"] / seqs,
            "padding_frac": g["pad"] / max(g["computed"], 1.0),  # of the positions the trainer's forwards computed
            "micro_batches": len(mbs),  # forwards per pass over the step's batch (this rank)
            "lr": lr,
        }
        if _gpu():  # scoring, training and sync; vLLM's pool reported apart
            out["trainer_mem_peak_gb"] = round((torch.cuda.max_memory_allocated() - self.engine_bytes) / 1e9, 3)
            out["engine_mem_gb"] = round(self.engine_bytes / 1e9, 3)
            out["trainer_mem_held_gb"] = round(self.held_gb, 3)
        return out
