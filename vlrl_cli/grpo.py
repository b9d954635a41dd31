"""GRPO, the whole loop in one file: records -> rollouts -> advantages -> clipped policy updates -> weight sync.

Variant (all recipe fields, one loop):
  * n samples per prompt, group-relative advantages (r - mean) / std, or Dr. GRPO's (r - mean) with
    `adv_std_norm: false` and `loss_agg: seq-mean-token-sum-norm`;
  * PPO clip with separate low/high bounds (DAPO clip-higher), `ppo_epochs` passes over the batch;
  * optional k3 KL to a frozen reference (`kl_coef`), optional dynamic sampling (drop all-equal groups);
  * rollout/train mismatch correction: truncated importance weights (`tis`) or sequence masking (`mask`).
Deviations from the papers: none intended; DAPO's overlong shaping is not implemented.

Data flow: records (records.py) -> rollouts (rollout.py, an engine from engines/) -> batches and
log-probs (batches.py) -> updates (losses.py, policy.py) -> weight sync (weights.py).

Launch: `vlrl train recipes/colors-tiny.yaml` (one process; CPU or one GPU), `vlrl train RECIPE --gpus N`
(DeepSpeed's launcher, one rank per GPU, each with its own colocated engine and its own prompts).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

from . import batches, policy as pol
from .config import Recipe
from .distributed import all_ranks, equal_micro_batches, loss_normalisers
from .engines import RolloutEngine, make_engine
from .losses import group_advantages, keep_informative_groups, micro_batch_loss
from .records import load_records, prompts_for_step
from .rollout import Trajectory, collect, run_episodes, start_episodes
from .runs import checkpoint_due, setup_run
from .weights import sync_weights


def validation_metrics(engine: RolloutEngine, records: list[dict], processor, recipe: Recipe, seed: int) -> dict:
    """Greedy (by default) rollouts on validation records: accuracy and mean reward."""
    r = recipe.rollout
    trajs = collect(engine, records, processor, 1, r.sampling(seed, evaluation=True), r.max_turns,
                    r.max_context_tokens, recipe.envs)
    engine.sleep()
    return {"val_accuracy": sum(bool(t.info.get("correct")) for t in trajs) / len(trajs),
            "val_reward_mean": sum(t.reward for t in trajs) / len(trajs)}


def filler_trajectory(trajs: list[Trajectory]) -> Trajectory:
    """The rank's shortest sequence as a zero-weight filler (distributed.equal_micro_batches). It may have no response
    (a prompt over the limit), so its last token counts as trained: the forward must reach every layer."""
    t = min(trajs, key=lambda t: len(t.token_ids))
    return dataclasses.replace(t, loss_mask=[0] * (len(t.token_ids) - 1) + [1])


def train_grpo(recipe: Recipe, resume: bool = False, on_step: Callable[[dict], None] | None = None) -> Path:
    a, r, tr = recipe.algorithm, recipe.rollout, recipe.trainer
    run = setup_run(recipe, resume)
    rank, world, processor, banned, policy, dev = run.rank, run.world, run.processor, run.banned, run.policy, run.dev
    ref = None
    if a.kl_coef > 0:
        from .modeling import load_vlm

        ref = load_vlm(recipe.model.path, getattr(torch, recipe.model.dtype), recipe.model.attention)
        ref = ref.to(dev).eval().requires_grad_(False)
    allocated_before_engine = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    engine = make_engine(r.engine, recipe.model.path, processor, dtype=recipe.model.dtype,
                         gpu_memory_utilization=r.gpu_memory_utilization, seed=tr.seed + rank,
                         attention=recipe.model.attention)
    # PyTorch's allocator keeps counting vLLM's pool (weights, KV cache) while it sleeps and has given the
    # memory back: subtract it to get the trainer's own figure
    engine_bytes = torch.cuda.memory_allocated() - allocated_before_engine if torch.cuda.is_available() else 0
    if run.start:
        sync_weights(policy, engine)  # resumed: the engine starts from the checkpoint's weights
    train_records = load_records(recipe.data.train)
    val_records = load_records(recipe.data.val, recipe.data.val_limit) if recipe.data.val else []

    # A step's episodes (environment resets, prompts rendered with their images) need no engine: the next
    # step's are built on a second thread while this step trains, so the generate phase only generates.
    # Rendering 32 prompts was ~0.2 s of a 3.2 s generate phase on an H200 (issue 15.3; the README has the
    # A/B). The thread has its own copy of the run's processor (the same settings by construction): a fast
    # tokenizer used by two threads at once can fail with "Already borrowed".
    render_processor = copy.deepcopy(processor)
    renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlrl-render")

    def episodes_for(step: int):
        idx = prompts_for_step(len(train_records), step, r.prompts_per_step, tr.seed, rank, world)
        return start_episodes([train_records[i] for i in idx], render_processor, r.n, r.max_context_tokens,
                              recipe.envs, recipe.data.max_prompt_tokens)

    upcoming = renderer.submit(episodes_for, run.start)
    max_len = r.max_new_tokens * r.max_turns
    trained_steps = 0
    for step in range(run.start, tr.steps):
        t0 = time.perf_counter()
        # what the trainer holds while the engine generates (weights, optimizer state, gradient buffers)
        held = (torch.cuda.memory_allocated() - engine_bytes) / 1e9 if torch.cuda.is_available() else None
        groups = upcoming.result()  # (a bad record's error surfaces here, in the step it belongs to)

        # 1. rollouts with the engine (awake only now)
        # (timed apart: waking the engine, its generate calls, the rest of the episodes, putting it to sleep)
        t_wake = time.perf_counter()
        engine.wake()
        gen_times = {"wake_s": time.perf_counter() - t_wake}
        trajs = run_episodes(engine, groups, r.sampling(tr.seed * 1_000_003 + step * 7919 + rank), r.max_turns,
                             gen_times)
        t_sleep = time.perf_counter()
        engine.sleep(discard_weights=True)  # step 5 pushes every weight before the next generate
        gen_times["sleep_s"] = time.perf_counter() - t_sleep
        t_gen = time.perf_counter() - t0
        if torch.cuda.is_available():  # from here to the sync: the trainer's phases
            torch.cuda.reset_peak_memory_stats()

        # 2. advantages per group; dynamic sampling drops groups that teach nothing
        rewards = torch.tensor([t.reward for t in trajs])
        groups = torch.tensor([t.group for t in trajs])
        adv = group_advantages(rewards, groups, a.adv_std_norm)
        keep = keep_informative_groups(rewards, groups) if a.dynamic_sampling else torch.ones_like(rewards, dtype=torch.bool)
        batch = [(t, float(adv[i])) for i, t in enumerate(trajs) if keep[i] and t.response_len > 0]

        # 3. micro-batches, built once; the PPO anchor (several epochs) and the KL reference, once per step
        t1 = time.perf_counter()
        n_tok = sum(t.response_len for t, _ in batch)
        n_seq = len(batch)
        norm = loss_normalisers({"tok": n_tok, "seq": n_seq})
        n_trained = int(norm["seq"] * world + 0.5)  # sequences trained on, all ranks
        micro = [[batch[i] for i in g]
                 for g in batches.micro_batches([len(t.token_ids) for t, _ in batch], tr.micro_batch, tr.pack_tokens)]
        # as many passes as every other rank, with zero-weight fillers
        micro, weights = equal_micro_batches(micro, lambda: (filler_trajectory(trajs), 0.0))
        pack = policy if tr.pack_tokens > 0 else None
        mbs = [batches.make_batch([t for t, _ in mb], processor, dev, packed_for=pack) for mb in micro]
        mb_adv = [torch.tensor([x for _, x in mb], device=dev) for mb in micro]
        policy.train()
        anchors, refs = {}, {}
        with torch.no_grad():
            for m, b in enumerate(mbs):
                if a.ppo_epochs > 1:  # the anchor must be the weights before this step's first update
                    anchors[m] = batches.sequence_logprobs(policy, b, r.temperature, banned, only=b.loss_mask)
                if ref is not None:
                    refs[m] = batches.sequence_logprobs(ref, b, r.temperature, banned, only=b.loss_mask)
        t_score = time.perf_counter() - t1
        # the next step's episodes, rendered while the GPU trains; not earlier, during the batch building above:
        # that is Python work too, and the two threads would only take turns at the interpreter lock (measured
        # on an H200: building the batches took the rendering's time longer)
        if step + 1 < tr.steps:
            upcoming = renderer.submit(episodes_for, step + 1)

        # 4. updates: gradients accumulate over micro-batches, one optimizer step per epoch
        t2 = time.perf_counter()
        stats = {"clip": 0.0, "drift_sum": 0.0, "drift_max": 0.0, "ratio_sum": 0.0, "ent": 0.0, "kl": 0.0, "tok": 0.0}
        grad_norm = None
        for epoch in range(a.ppo_epochs if mbs else 0):
            for m, b in enumerate(mbs):
                train_logp = batches.sequence_logprobs(policy, b, r.temperature, banned, only=b.loss_mask)
                anchor_logp = anchors.get(m, train_logp.detach())
                loss, clip_flags, kl = micro_batch_loss(train_logp, anchor_logp, b.engine_logp, refs.get(m), mb_adv[m],
                                                        b.loss_mask, a, norm["tok"] or 1.0, norm["seq"] or 1.0, max_len)
                pol.backward_step(policy, loss * weights[m], last=(m == len(mbs) - 1))
                if epoch == 0 and weights[m]:  # the step's statistics: the policy as it sampled, before any update
                    mask = b.loss_mask
                    d = (anchor_logp - b.engine_logp).abs() * mask
                    stats["drift_sum"] += float(d.sum())
                    stats["drift_max"] = max(stats["drift_max"], float(d.max()))
                    stats["ratio_sum"] += float((torch.exp(anchor_logp - b.engine_logp) * mask).sum())
                    stats["ent"] += float((-train_logp.detach() * mask).sum())  # sampled-token entropy estimate
                    stats["clip"] += float(clip_flags.sum())
                    stats["kl"] += float((kl.detach() * mask).sum()) if kl is not None else 0.0
                    stats["tok"] += float(mask.sum())
            grad_norm = pol.optimizer_step(policy)
        t_train = time.perf_counter() - t2

        trained = n_trained > 0
        trained_steps += trained
        if not trained:
            too_long = sum(t.done_reason == "prompt_too_long" for t in trajs)
            why = (f"{too_long} of {len(trajs)} samples had prompts over data.max_prompt_tokens "
                   f"({recipe.data.max_prompt_tokens})" if too_long else
                   "every group's rewards were equal (dynamic sampling dropped them)" if a.dynamic_sampling and not keep.any()
                   else "no sample generated a token")
            run.nothing_trained(recipe, step + 1, why, trained_steps)

        # 5. push the new weights into the engine (every step: the next rollout must be on-policy, and the
        # engine dropped its copy when it went to sleep)
        t_sync = sync_weights(policy, engine)
        trainer_peak = (torch.cuda.max_memory_allocated() - engine_bytes) / 1e9 if torch.cuda.is_available() else None

        step_s = time.perf_counter() - t0
        # the step's numbers over all ranks (each rank rolled out its own prompts)
        g = all_ranks({
            **{k: v for k, v in stats.items() if k != "drift_max"},
            "seqs": len(trajs), "reward": float(rewards.sum()), "correct": sum(bool(t.info.get("correct")) for t in trajs),
            "format": sum(bool(t.info.get("format_ok")) for t in trajs), "gen_tokens": sum(t.response_len for t in trajs),
            "prompt_tokens": sum(t.prompt_len for t in trajs), "groups_kept": int(keep.sum()) // r.n,
            "too_long": sum(t.done_reason == "prompt_too_long" for t in trajs) // r.n,
            "pad": sum(b.positions[1] - b.positions[0] for b in mbs), "computed": sum(b.positions[1] for b in mbs)})
        drift_max = all_ranks({"m": stats["drift_max"]}, op="max")["m"]
        tok, seqs = max(g["tok"], 1.0), g["seqs"]
        metrics = {
            "step": step + 1,
            "reward_mean": g["reward"] / seqs,
            "accuracy": g["correct"] / seqs,
            "format_rate": g["format"] / seqs,
            "response_len_mean": g["gen_tokens"] / seqs,
            "entropy": g["ent"] / tok,
            "kl": g["kl"] / tok if ref is not None else None,
            "clip_frac": g["clip"] / tok,
            "grad_norm": grad_norm,
            "drift_abs_mean": g["drift_sum"] / tok,
            "drift_abs_max": drift_max,
            "is_ratio_mean": g["ratio_sum"] / tok,
            "groups_kept": int(g["groups_kept"]),
            "trained_sequences": n_trained,
            "prompts_too_long": int(g["too_long"]),
            "time_generate_s": round(t_gen, 4),
            # its parts: the engine's generate calls, waking it and putting it to sleep; the rest is environments,
            # rewards, observations and any wait for the render thread (the prompts are rendered during training)
            "time_generate_engine_s": round(gen_times["engine_s"], 4),
            "time_generate_wake_s": round(gen_times["wake_s"], 4),
            "time_generate_sleep_s": round(gen_times["sleep_s"], 4),
            "time_score_s": round(t_score, 4),
            "time_train_s": round(t_train, 4),
            "time_sync_s": round(t_sync, 4),
            "tokens_per_s": g["gen_tokens"] / world / step_s,  # generated tokens per second per rank
            "time_step_s": round(step_s, 4),
            "prompt_len_mean": g["prompt_tokens"] / seqs,
            "padding_frac": g["pad"] / max(g["computed"], 1.0),  # of the positions the trainer's forwards computed
            "micro_batches": len(mbs),  # forwards per pass over the step's batch (this rank)
            "lr": policy.get_lr()[0],
        }
        if torch.cuda.is_available():  # scoring, training and sync; vLLM's pool reported apart
            metrics["trainer_mem_peak_gb"] = round(trainer_peak, 3)
            metrics["engine_mem_gb"] = round(engine_bytes / 1e9, 3)
            metrics["trainer_mem_held_gb"] = round(held, 3)
        if val_records and tr.eval_every and (step + 1) % tr.eval_every == 0:
            wait([upcoming])  # the validation episodes' environments never run beside the next step's resets
            metrics.update(validation_metrics(engine, val_records, processor, recipe, tr.seed))
        if checkpoint_due(step + 1, tr):
            run.save(recipe, step + 1)
        run.log_step(metrics, on_step)
    renderer.shutdown()
    return recipe.run_dir
