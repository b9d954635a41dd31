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
from pathlib import Path
from typing import Callable

import torch

from . import batches, policy as pol
from .recipe import Recipe
from .distributed import all_ranks, equal_micro_batches, loss_normalisers
from ..errors import UserError
from ..data.records import ground_truths, load_records, prompts_for_step
from ..model.render import render_prompt
from ..rollout.episodes import Sequence
from .runs import checkpoint_due, setup_run


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
        raise UserError(f"record {record.get('id')}: sft_target=reference but it has no reference answer")
    answers = ground_truths(record)
    if mode == "ground_truth" and not answers:
        raise UserError(f"record {record.get('id')}: sft_target=ground_truth but it has no ground truth")
    gt = answers[0] if answers else ""  # of several accepted answers, the first is the one to learn
    if mode == "random_choice":
        options = extra.get("colors") or extra.get("choices")
        if not options:
            raise UserError(f"record {record.get('id')}: sft_target=random_choice needs extra_info.colors or choices")
        gt = rng.choice(list(options))
    return prompt, f"\\boxed{{{gt}}}" if record["env_class"] == "geometry3k" else gt


def build_seq(record: dict, processor, mode: str, rng: random.Random, max_prompt: int | None = None) -> Sequence | None:
    """The record's prompt + target as one training sequence; None when the prompt is over `max_prompt` tokens."""
    prompt, text = target_text(record, mode, rng)
    rendered = render_prompt(processor, prompt)
    if max_prompt is not None and rendered.length > max_prompt:
        return None
    target = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    # no engine in SFT: its log-probs are zeros (the batch layout is the rollouts')
    return Sequence(rendered.input_ids + target, [0] * rendered.length + [1] * len(target),
                    [0.0] * (rendered.length + len(target)), rendered.tensors)


def filler_seq(records: list[dict], idx: list[int], processor, mode: str, rng: random.Random) -> Sequence:
    """A zero-weight filler for a rank with fewer micro-batches than the others (distributed.
    equal_micro_batches), e.g. all its prompts over the limit: the shortest of its prompts, however long."""
    seqs = [build_seq(records[i], processor, mode, random.Random(rng.random()), None) for i in idx]
    return min(seqs, key=lambda s: len(s.token_ids))


def train_sft(recipe: Recipe, resume: bool = False, on_step: Callable[[dict], None] | None = None) -> Path:
    tr, a = recipe.trainer, recipe.algorithm
    run = setup_run(recipe, resume)
    rank, world, processor, banned, policy, dev = run.rank, run.world, run.processor, run.banned, run.policy, run.dev
    records = load_records(recipe.data.train)
    per_step = recipe.rollout.prompts_per_step
    trained_steps = 0
    for step in range(run.start, tr.steps):
        t0 = time.perf_counter()
        idx = prompts_for_step(len(records), step, per_step, tr.seed, rank, world)
        rng = random.Random(tr.seed * 1_000_003 + step)  # random_choice targets: reproducible per step
        built = [build_seq(records[i], processor, a.sft_target, rng, recipe.data.max_prompt_tokens) for i in idx]
        seqs = [s for s in built if s is not None]
        too_long = len(built) - len(seqs)
        trained = all_ranks({"n": len(seqs)})["n"] > 0
        trained_steps += trained
        if not trained:
            run.nothing_trained(recipe, step + 1, f"all {len(built)} prompts were over data.max_prompt_tokens "
                                f"({recipe.data.max_prompt_tokens})", trained_steps)
        n_tok = sum(sum(s.loss_mask) for s in seqs)
        norm = loss_normalisers({"tok": n_tok})["tok"] or 1.0
        micro = [[seqs[i] for i in g]
                 for g in batches.micro_batches([len(s.token_ids) for s in seqs], tr.micro_batch, tr.pack_tokens)]
        # as many passes as every other rank, with zero-weight fillers
        micro, weights = equal_micro_batches(micro, lambda: filler_seq(records, idx, processor, a.sft_target, rng))
        policy.train()
        total, pad, computed = 0.0, 0, 0
        for m, mb in enumerate(micro):
            b = batches.make_batch(mb, processor, dev, packed_for=policy if tr.pack_tokens > 0 else None)
            pad, computed = pad + b.positions[1] - b.positions[0], computed + b.positions[1]
            logp = batches.sequence_logprobs(policy, b, 1.0, banned, only=b.loss_mask)
            loss = -(logp * b.loss_mask).sum() / norm * weights[m]
            pol.backward_step(policy, loss, last=m == len(micro) - 1)
            total += loss.item()
        grad_norm = pol.optimizer_step(policy) if trained else None
        g = all_ranks({"nll": total * norm, "tok": n_tok, "too_long": too_long, "pad": pad, "computed": computed})
        metrics = {"step": step + 1, "loss": g["nll"] / max(g["tok"], 1), "grad_norm": grad_norm, "tokens": int(g["tok"]),
                   "padding_frac": g["pad"] / max(g["computed"], 1), "micro_batches": len(micro),
                   "prompts_too_long": int(g["too_long"]), "time_train_s": round(time.perf_counter() - t0, 4), "lr": policy.get_lr()[0]}
        if torch.cuda.is_available():
            metrics["trainer_mem_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            torch.cuda.reset_peak_memory_stats()
        if checkpoint_due(step + 1, tr):
            run.save(recipe, step + 1, last=step + 1 == tr.steps)
        run.log_step(metrics, on_step)
    return recipe.run_dir
