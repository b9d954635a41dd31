"""GRPO, the whole loop in one file: records -> rollouts -> advantages -> clipped policy updates -> weight sync.

Variant (all recipe fields, one loop):
  * n samples per prompt, group-relative advantages (r - mean) / std, or Dr. GRPO's (r - mean) with
    `adv_std_norm: false` and `loss_agg: seq-mean-token-sum-norm`;
  * PPO clip with separate low/high bounds (DAPO clip-higher), `ppo_epochs` passes over the batch;
  * optional k3 KL to a frozen reference (`kl_coef`), optional dynamic sampling (drop all-equal groups);
  * rollout/train mismatch correction: truncated importance weights (`tis`) or sequence masking (`mask`).
Deviations from the papers: none intended; DAPO's overlong shaping is not implemented.

Data flow: records (data/records.py) -> rollouts (rollout/episodes.py, an engine from rollout/engines/) ->
batches and log-probs (batches.py) -> updates (losses.py, policy.py) -> weight sync (weight_sync.py). The
step's statistics, timings and memory figures: grpo_stats.py.

Launch: `vlrl train recipes/colors-tiny.yaml` (one process; CPU or one GPU), `vlrl train RECIPE --gpus N`
(DeepSpeed's launcher, one rank per GPU, each with its own colocated engine and its own prompts). With
`rollout.engine_ranks: k` the last k ranks only generate (rollout_ranks.py) and this loop runs on the others,
receiving its rollouts instead of generating them, up to `rollout.max_staleness` updates behind.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

from ..data.records import load_records, prompts_for_step
from ..rollout.engines import RolloutEngine, make_engine
from ..rollout.episodes import Trajectory, collect, run_episodes, start_episodes, turn_limit
from . import batches, policy as pol
from .distributed import equal_micro_batches, loss_normalisers
from .grpo_stats import StepStats
from .losses import group_advantages, keep_informative_groups, micro_batch_loss
from .recipe import Recipe, engine_limits
from . import rollout_ranks
from .runs import checkpoint_due, setup_run
from .weight_sync import sync_weights


def validation_metrics(engine: RolloutEngine, records: list[dict], processor, recipe: Recipe, seed: int) -> dict:
    """Greedy (by default) rollouts on validation records: accuracy and mean reward."""
    r = recipe.rollout
    trajs = collect(engine, records, processor, 1, r.sampling(seed, evaluation=True), r.max_turns,
                    r.max_context_tokens, recipe.envs, max_images=r.history.max_images)
    engine.sleep()
    return {"val_accuracy": sum(bool(t.info.get("correct")) for t in trajs) / len(trajs),
            "val_reward_mean": sum(t.reward for t in trajs) / len(trajs)}


def filler_trajectory(trajs: list[Trajectory]) -> Trajectory:
    """The rank's shortest sequence as a zero-weight filler (distributed.equal_micro_batches). It may have no response
    (a prompt over the limit), so its last token counts as trained: the forward must reach every layer."""
    t = min((t for t in trajs if t.token_ids), key=lambda t: len(t.token_ids))  # (env_failures: one exists)
    return dataclasses.replace(t, loss_mask=[0] * (len(t.token_ids) - 1) + [1])


def reference_model(recipe: Recipe, policy, dev):
    """The frozen policy the k3 KL pulls towards, scoring with the policy's own forward (attention, packed
    rows, compiled blocks; model.prepare): at step 1 the two agree. A LoRA policy is its own reference with
    its adapters switched off (the base model it started from): no second copy of the weights."""
    from .lora import is_lora
    from .policy import compile_wanted, prepare_model

    if is_lora(policy.module):
        return None
    m, tr = recipe.model, recipe.trainer
    ref = prepare_model(m.path, m.dtype, m.attention, packed=tr.pack_tokens > 0,
                        compile_blocks=compile_wanted(m.compile, tr.zero_stage), share_images=m.share_images)
    return ref.to(dev).eval().requires_grad_(False)


def reference_logprobs(ref, policy, batch, temperature: float, banned: list[int]):
    """The reference's log-probs of a batch's trained tokens (ref None: the LoRA policy with adapters off)."""
    if ref is not None:
        return batches.sequence_logprobs(ref, batch, temperature, banned, only=batch.loss_mask)
    with policy.module.disable_adapter():
        return batches.sequence_logprobs(policy, batch, temperature, banned, only=batch.loss_mask)


def dr_grpo_length(recipe: Recipe, records: list[dict]) -> int:
    """Dr. GRPO's constant normaliser: the most tokens one trained sequence can hold, an answer per turn, and
    never more than the context (an environment that allows 100,000 turns would otherwise shrink every
    gradient by its turn count)."""
    r = recipe.rollout
    return min(r.max_new_tokens * turn_limit(records, r.max_turns, recipe.envs), r.max_context_tokens)


def rollout_engine(recipe: Recipe, processor, rank: int, records: list[dict]) -> RolloutEngine:
    """The recipe's rollout engine for `rank`'s prompts, sized for these records' episodes."""
    r = recipe.rollout
    return make_engine(r.engine, recipe.model.path, processor, dtype=recipe.model.dtype,
                       gpu_memory_utilization=r.gpu_memory_utilization, seed=recipe.trainer.seed + rank,
                       attention=recipe.model.attention, limits=engine_limits(recipe, records))


def step_episodes(recipe: Recipe, records: list[dict], processor, step: int, rank: int, world: int):
    """Step `step`'s episodes for trainer `rank` of `world`: its prompts, reset and rendered (no engine needed)."""
    r, tr = recipe.rollout, recipe.trainer
    idx = prompts_for_step(len(records), step, r.prompts_per_step, tr.seed, rank, world)
    return start_episodes([records[i] for i in idx], processor, r.n, r.max_context_tokens, recipe.envs,
                          recipe.data.max_prompt_tokens, r.history.max_images)


def step_sampling(recipe: Recipe, step: int, rank: int):
    """The sampling settings (and seed) of step `step`'s rollouts for trainer `rank`."""
    return recipe.rollout.sampling(recipe.trainer.seed * 1_000_003 + step * 7919 + rank)


def train_grpo(recipe: Recipe, resume: bool = False, on_step: Callable[[dict], None] | None = None) -> Path:
    a, r, tr = recipe.algorithm, recipe.rollout, recipe.trainer
    bridge = None
    if r.engine_ranks:  # rollouts on ranks of their own: an engine rank generates for the whole run and returns
        placement = rollout_ranks.placement_for(r.engine_ranks)
        if placement.is_engine:
            rollout_ranks.run_engine_rank(recipe, placement)
            return recipe.run_dir
        bridge = rollout_ranks.connect(placement)  # this trainer's process group: the trainers alone
    run = setup_run(recipe, resume)
    rank, world, processor, banned, policy, dev = run.rank, run.world, run.processor, run.banned, run.policy, run.dev
    with_ref = a.kl_coef > 0
    ref = reference_model(recipe, policy, dev) if with_ref else None
    train_records = load_records(recipe.data.train)
    val_records = load_records(recipe.data.val, recipe.data.val_limit) if recipe.data.val else []
    allocated_before_engine = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    engine = None if bridge else rollout_engine(recipe, processor, rank, train_records + val_records)
    # PyTorch's allocator keeps counting vLLM's pool while it sleeps: the trainer's own figures subtract it
    engine_bytes = torch.cuda.memory_allocated() - allocated_before_engine if torch.cuda.is_available() else 0
    if bridge:
        rollout_ranks.start_engine_ranks(bridge, policy, run.start)  # resumed: the checkpoint's weights go too
    elif run.start:
        sync_weights(policy, engine)  # resumed: the engine starts from the checkpoint's weights

    # A step's episodes (environment resets, prompts rendered with their images) need no engine: the next
    # step's are built on a second thread while this step trains, so the generate phase only generates
    # (rendering 32 prompts was ~0.2 s of a 3.2 s generate phase on an H200). The thread has its own copy of
    # the run's processor: a fast tokenizer used by two threads at once can fail with "Already borrowed".
    render_processor = copy.deepcopy(processor)
    renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlrl-render")

    def episodes_for(step: int):
        return step_episodes(recipe, train_records, render_processor, step, rank, world)

    upcoming = renderer.submit(episodes_for, run.start) if engine else None
    max_len = dr_grpo_length(recipe, train_records)
    trained_steps = 0
    for step in range(run.start, tr.steps):
        stats = StepStats(engine_bytes)
        if bridge:  # 1. rollouts from this trainer's engine rank (generated while the last step trained)
            trajs, sent = rollout_ranks.receive_rollouts(bridge, step)
            staleness = rollout_ranks.check_staleness(step, sent["version"], r.max_staleness)
            gen_times = {"engine_s": sent["engine_s"], "wake_s": 0.0, "sleep_s": 0.0}
        else:  # 1. rollouts with the engine (awake only now)
            groups = upcoming.result()  # (a bad record's error surfaces here, in the step it belongs to)
            clock = time.perf_counter()
            engine.wake()
            gen_times = {"wake_s": time.perf_counter() - clock}
            trajs = run_episodes(engine, groups, step_sampling(recipe, step, rank), r.max_turns, gen_times)
            t_sleep = time.perf_counter()
            engine.sleep(discard_weights=True)  # step 5 pushes every weight before the next generate
            gen_times["sleep_s"] = time.perf_counter() - t_sleep
            staleness = 0
        clock = stats.phase("generate", stats.t0)
        stats.training_starts()

        # 2. advantages per group; dynamic sampling drops groups that teach nothing, and a group where an
        # environment failed is not trained at all (its failed episode has no reward to compare with)
        failed_groups = env_failures(run, recipe, step + 1, trajs)
        rewards = torch.tensor([t.reward for t in trajs])
        group_ids = torch.tensor([t.group for t in trajs])
        adv = group_advantages(rewards, group_ids, a.adv_std_norm)
        keep = keep_informative_groups(rewards, group_ids) if a.dynamic_sampling else torch.ones_like(rewards, dtype=torch.bool)
        keep &= torch.tensor([t.group not in failed_groups for t in trajs], dtype=torch.bool)
        # each sequence the engine generated from (one an episode, or one a segment of a cut image history)
        batch = [(seq, float(adv[i])) for i, t in enumerate(trajs) if keep[i] for seq in t.sequences()
                 if sum(seq.loss_mask) > 0]

        # 3. micro-batches, built once; the PPO anchor (several epochs) and the KL reference, once per step
        norm = loss_normalisers({"tok": sum(sum(seq.loss_mask) for seq, _ in batch), "seq": len(batch)})
        n_trained = int(norm["seq"] * world + 0.5)  # sequences trained on, all ranks
        micro = [[batch[i] for i in g]
                 for g in batches.micro_batches([len(t.token_ids) for t, _ in batch], tr.micro_batch, tr.pack_tokens)]
        # as many passes as every other rank: the added ones hold a filler that counts 0 in the loss
        micro, counts = equal_micro_batches(micro, lambda: (filler_trajectory(trajs), 0.0))
        pack = policy if tr.pack_tokens > 0 else None
        mbs = [batches.make_batch([t for t, _ in mb], processor, dev, packed_for=pack) for mb in micro]
        mb_adv = [torch.tensor([x for _, x in mb], device=dev) for mb in micro]
        policy.train()
        anchors, refs = {}, {}
        with torch.no_grad():
            for m, b in enumerate(mbs):
                if a.ppo_epochs > 1:  # the anchor must be the weights before this step's first update
                    anchors[m] = batches.sequence_logprobs(policy, b, r.temperature, banned, only=b.loss_mask)
                if with_ref:
                    refs[m] = reference_logprobs(ref, policy, b, r.temperature, banned)
        clock = stats.phase("score", clock)
        # the next step's episodes, rendered while the GPU trains; not earlier, during the batch building above:
        # that is Python work too, and the two threads would only take turns at the interpreter lock
        if step + 1 < tr.steps and engine:
            upcoming = renderer.submit(episodes_for, step + 1)

        # 4. updates: gradients accumulate over micro-batches, one optimizer step per epoch
        grad_norm = None
        for epoch in range(a.ppo_epochs if mbs else 0):
            for m, b in enumerate(mbs):
                train_logp = batches.sequence_logprobs(policy, b, r.temperature, banned, only=b.loss_mask)
                anchor_logp = anchors.get(m, train_logp.detach())
                loss, clip_flags, kl = micro_batch_loss(train_logp, anchor_logp, b.engine_logp, refs.get(m), mb_adv[m],
                                                        b.loss_mask, a, norm["tok"] or 1.0, norm["seq"] or 1.0, max_len)
                pol.backward_step(policy, loss * counts[m], last=(m == len(mbs) - 1))
                if counts[m]:
                    if epoch == 0:
                        stats.sampled(anchor_logp, b.engine_logp, b.loss_mask)
                    stats.updated(train_logp, clip_flags, kl, b.loss_mask)
            grad_norm = pol.optimizer_step(policy)
        clock = stats.phase("train", clock)

        trained = n_trained > 0
        trained_steps += trained
        if not trained:
            run.nothing_trained(recipe, step + 1, why_nothing_trained(trajs, keep, recipe), trained_steps)

        # 5. push the new weights into the engine (every step: the next rollout must be on-policy, and the
        # engine dropped its copy when it went to sleep); engine ranks get them while a later generation needs them
        sent_bytes = 0
        if bridge is None:
            sync_weights(policy, engine)
        elif rollout_ranks.weights_needed(step, tr.steps, r.max_staleness):
            sent_bytes = rollout_ranks.send_weights(bridge, policy, step + 1)
        stats.phase("sync", clock)

        metrics = stats.metrics(step + 1, trajs, keep, mbs, n_trained, r.n, with_ref, world, grad_norm,
                                policy.get_lr()[0], gen_times)
        metrics["rollout_staleness"] = staleness
        if bridge:
            metrics["weights_sent_mb"] = round(sent_bytes / 2**20, 3)
        stop = False
        if val_records and tr.eval_every and (step + 1) % tr.eval_every == 0:
            wait([upcoming])  # the validation episodes' environments never run beside the next step's resets
            metrics.update(validation_metrics(engine, val_records, processor, recipe, tr.seed))
            stop = run.reached_target(recipe, step + 1, metrics["val_accuracy"])
        if checkpoint_due(step + 1, tr) or stop:
            run.save(recipe, step + 1, last=stop or step + 1 == tr.steps)
        run.log_step(metrics, on_step)
        if stop:
            break
    renderer.shutdown()
    return recipe.run_dir


def env_failures(run, recipe: Recipe, step: int, trajs: list[Trajectory]) -> set[int]:
    """The groups of this rank where an environment failed (EnvError), recorded in the run's env_errors.jsonl.
    The same decision on every rank: stop when every episode of the step failed (a broken environment, not a
    bad record), or when some rank is left without a single sequence to train or pad with."""
    from ..errors import UserError
    from .distributed import all_ranks

    import sys

    failed = [t for t in trajs if t.done_reason == "env_error"]
    if failed:
        run.record_env_errors(recipe, step, failed)
    usable = any(t.token_ids for t in trajs)
    total = all_ranks({"failed": len(failed), "episodes": len(trajs), "ranks_without": float(not usable)})
    if not total["failed"]:
        return set()
    if total["failed"] == total["episodes"] or total["ranks_without"]:
        first = failed[0].info["env_error"] if failed else "(on another rank)"
        where = "" if total["failed"] == total["episodes"] else " on one rank"
        raise UserError(f"step {step}: every episode{where} failed in its environment (a broken environment, not "
                        f"one bad record); the first: {first}")
    if run.rank == 0:
        print(f"warning: step {step}: {int(total['failed'])} of {int(total['episodes'])} episodes failed in their "
              f"environment; their groups are not trained (reasons in {recipe.run_dir / 'env_errors.jsonl'})",
              file=sys.stderr, flush=True)
    return {t.group for t in failed}


def why_nothing_trained(trajs, keep, recipe: Recipe) -> str:
    too_long = sum(t.done_reason == "prompt_too_long" for t in trajs)
    if too_long:
        return (f"{too_long} of {len(trajs)} samples had prompts over data.max_prompt_tokens "
                f"({recipe.data.max_prompt_tokens})")
    if any(t.done_reason == "env_error" for t in trajs):
        return "every group held an episode whose environment failed (the run's env_errors.jsonl says why)"
    if recipe.algorithm.dynamic_sampling and not keep.any():
        return "every group's rewards were equal (dynamic sampling dropped them)"
    return "no sample generated a token"
