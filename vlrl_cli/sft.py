"""SFT: cross-entropy on the assistant tokens of records with reference answers.

The target of a record (`algorithm.sft_target`):
  reference      assistant messages at the end of its prompt (a reference trajectory), else
                 extra_info.reference
  ground_truth   the env's answer format around reward_spec.ground_truth (`\\boxed{}` for geometry3k)
  random_choice  a seeded random pick from extra_info.colors / extra_info.choices: teaches the answer
                 format without the answer (the CPU demo's warm-up before GRPO)
Sequences go through the same render path and trainer forward as GRPO.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import runs, training
from .config import Recipe
from .engines import placeholder_token_ids
from .render import load_processor, render_prompt


@dataclass
class SFTSeq:
    token_ids: list[int]
    loss_mask: list[int]
    old_logp: list[float]
    tensors: dict = field(default_factory=dict)


def target_text(record: dict, mode: str, rng: random.Random) -> tuple[list[dict], str]:
    """(prompt messages, assistant text to learn)."""
    prompt = record["prompt"]
    extra = record.get("extra_info") or {}
    if mode == "reference":
        if prompt[-1]["role"] == "assistant":
            c = prompt[-1]["content"]
            return prompt[:-1], c if isinstance(c, str) else "".join(p.get("text", "") for p in c)
        if extra.get("reference"):
            return prompt, str(extra["reference"])
        raise ValueError(f"record {record.get('id')}: sft_target=reference but it has no reference answer")
    gt = str(record["reward_spec"].get("ground_truth"))
    if mode == "random_choice":
        options = extra.get("colors") or extra.get("choices")
        if not options:
            raise ValueError(f"record {record.get('id')}: sft_target=random_choice needs extra_info.colors or choices")
        gt = rng.choice(list(options))
    return prompt, f"\\boxed{{{gt}}}" if record["env_class"] == "geometry3k" else gt


def build_seq(record: dict, processor, mode: str, rng: random.Random) -> SFTSeq:
    prompt, text = target_text(record, mode, rng)
    rendered = render_prompt(processor, prompt)
    target = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    return SFTSeq(rendered.input_ids + target, [0] * rendered.length + [1] * len(target),
                  [0.0] * (rendered.length + len(target)), rendered.tensors)


def train_sft(recipe: Recipe, resume: bool = False, on_step: Callable[[dict], None] | None = None) -> Path:
    from .grpo import load_records, prompts_for_step

    tr, a = recipe.trainer, recipe.algorithm
    rank, world = training.init_distributed()
    training.seed_everything(tr.seed + rank)
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    processor = load_processor(recipe.model.path)
    banned = placeholder_token_ids(processor)
    policy = training.build_engine(recipe.model.path, tr.lr, tr.weight_decay, tr.warmup_steps, tr.zero_stage,
                                   tr.offload, tr.grad_clip, recipe.model.dtype, recipe.model.gradient_checkpointing,
                                   tr.steps * a.ppo_epochs if a.name == "grpo" else tr.steps, tr.lr_schedule)
    dev = training.device()
    records = load_records(recipe.data.train)
    start = 0
    ckpt = runs.latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}/checkpoints")
    if ckpt is not None:
        start = runs.load_checkpoint(policy, ckpt)["step"]
    if rank == 0:
        import yaml

        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    log = runs.MetricsLog(run_dir, start if ckpt else None, recipe.run.tensorboard, recipe.run.wandb) if rank == 0 else None
    per_step = recipe.rollout.prompts_per_step
    for step in range(start, tr.steps):
        t0 = time.perf_counter()
        idx = prompts_for_step(len(records), step, per_step, tr.seed, rank, world)
        rng = random.Random(tr.seed * 1_000_003 + step)  # random_choice targets: reproducible per step
        seqs = [build_seq(records[i], processor, a.sft_target, rng) for i in idx]
        n_tok = sum(sum(s.loss_mask) for s in seqs)
        micro = [seqs[i:i + tr.micro_batch] for i in range(0, len(seqs), tr.micro_batch)]
        policy.train()
        total = 0.0
        for m, mb in enumerate(micro):
            b = training.make_batch(mb, processor.tokenizer.pad_token_id, dev)
            logp = training.sequence_logprobs(policy, b, 1.0, banned)
            loss = -(logp * b.loss_mask).sum() / n_tok
            training.backward_step(policy, loss, last=m == len(micro) - 1)
            total += float(loss)
        grad_norm = training.optimizer_step(policy)
        metrics = {"step": step + 1, "loss": total, "grad_norm": grad_norm,
                   "tokens": n_tok, "time_train_s": round(time.perf_counter() - t0, 4), "lr": policy.get_lr()[0]}
        if (tr.save_every and (step + 1) % tr.save_every == 0) or step + 1 == tr.steps:
            runs.save_checkpoint(policy, processor, run_dir, step + 1, {"step": step + 1, "rng": runs.rng_state()}, rank)
        if log:
            log.write(metrics)
        if on_step and rank == 0:
            on_step(metrics)
    return run_dir
