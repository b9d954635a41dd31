"""The trainer side: distributed set-up, the DeepSpeed engine, batched log-prob forwards, weight export.

Used by the GRPO loop (grpo.py), SFT (sft.py) and check-drift. One process per GPU (or one on the CPU);
DeepSpeed's launcher starts the ranks for multi-GPU runs.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .engines.hf import token_logprobs
from .modeling import load_vlm


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Single process: fake a one-rank world so DeepSpeed runs unchanged."""
    import deepspeed

    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    own_port = "MASTER_PORT" not in os.environ
    if own_port:
        import socket

        with socket.socket() as s:  # a free port: two runs on one machine must not collide
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    if own_port:  # our store holds it now; a process started from this one must not inherit (and reuse) it
        os.environ.pop("MASTER_PORT")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")


def persistence_for(world: int, threshold: int | None) -> int:
    """ZeRO-3's stage3_param_persistence_threshold: parameters with fewer elements stay whole on every rank.

    Default (None): DeepSpeed's 100k on several ranks; on one rank every parameter. A one-rank partition is
    the whole model anyway, so partitioning saves no memory there and only adds a gather per module per
    pass. (Measured on an H200 it is not where ZeRO-3's cost lies: its per-module hooks are; see README,
    Performance. One GPU is better served by stage 2.)
    """
    if threshold is not None:
        return threshold
    return 10**15 if world == 1 else 100_000


def deepspeed_config(stage: int, offload: bool, grad_clip: float, dtype: str, persistence_threshold: int | None = None) -> dict:
    zero: dict = {"stage": stage}
    if offload and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        zero.update(stage3_param_persistence_threshold=persistence_for(world, persistence_threshold),
                    stage3_gather_16bit_weights_on_model_save=True)
    return {
        # we feed our own micro-batches and mark the accumulation boundary ourselves (see backward_step)
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then constant or linear decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "linear" and total > warmup:
        return 1.0 - 0.9 * (step - warmup) / max(1, total - warmup - 1)
    return 1.0


def build_engine(model_path: str, lr: float, weight_decay: float, warmup: int, stage: int, offload: bool,
                 grad_clip: float, dtype: str, gradient_checkpointing: bool = False, total_steps: int = 0,
                 schedule: str = "constant", persistence_threshold: int | None = None, attention: str = "auto"):
    """The policy under DeepSpeed: (engine, model config)."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    cfg = deepspeed_config(stage, offload, grad_clip, dtype, persistence_threshold)
    # transformers' own ZeRO-3 integration: weights are loaded straight into partitions (no full copy per
    # rank) while this object lives. It is process-global, so it is switched off again below: models
    # loaded later (the hf engine's copy, a KL reference) must load whole.
    hf_ds = HfDeepSpeedConfig(cfg) if stage == 3 else None
    model = load_vlm(model_path, getattr(torch, dtype), attention)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if offload and stage > 0:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps, schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    if hf_ds is not None:
        unset_hf_deepspeed_config()
    return engine


@dataclass
class Batch:
    """Right-padded sequences with their image tensors, ready for one forward."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    tensors: dict  # pixel_values (all images of all rows, in order), image_grid_thw, ...
    loss_mask: torch.Tensor  # [B, T] 1 where the token at t is trained
    engine_logp: torch.Tensor  # [B, T]


def make_batch(seqs, pad_id: int, dev: torch.device) -> Batch:
    """seqs: objects with token_ids, loss_mask, old_logp (engine), tensors (see rollout.Trajectory)."""
    T = max(len(s.token_ids) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    elp = torch.zeros((B, T))
    for i, s in enumerate(seqs):
        n = len(s.token_ids)
        ids[i, :n] = torch.tensor(s.token_ids)
        att[i, :n] = 1
        mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.float)
        elp[i, :n] = torch.tensor(s.old_logp, dtype=torch.float)
    tensors: dict = {}
    for s in seqs:
        for k, v in s.tensors.items():
            if k == "mm_token_type_ids":
                continue
            tensors.setdefault(k, []).append(v)
    tensors = {k: torch.cat(v, dim=0).to(dev) for k, v in tensors.items()}
    return Batch(ids.to(dev), att.to(dev), tensors, mask.to(dev), elp.to(dev))


def sequence_logprobs(model, batch: Batch, temperature: float, banned: list[int]) -> torch.Tensor:
    """[B, T] log-prob of token t given tokens < t (0 at t = 0), the same formula as the engines use."""
    tensors = dict(batch.tensors)
    if "pixel_values" in tensors:
        tensors["pixel_values"] = tensors["pixel_values"].to(next(model.parameters()).dtype)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **tensors)
    logits = out.logits[:, :-1].float()
    lp = token_logprobs(logits, batch.input_ids[:, 1:], temperature, banned)
    # prompt positions holding image placeholders have log-prob -inf (never sampleable); they are never
    # trained, and a finite 0 there keeps `logp * mask` free of inf * 0 = nan
    lp = lp.masked_fill(torch.isinf(lp), 0.0)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def all_ranks(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or max) each value over all ranks; unchanged in a one-process run."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def backward_step(engine, loss: torch.Tensor, last: bool) -> None:
    """Accumulate gradients over a variable number of micro-batches; the optimizer steps on the last."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def optimizer_step(engine) -> float | None:
    """Step the optimizer; returns the global gradient norm (before clipping).

    DeepSpeed reports the norm for ZeRO 1-3 and bf16; for plain fp32 ZeRO-0 it does not, so we take it
    from the gradients first.
    """
    norm = None
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.stack(grads).norm()) if grads else 0.0
    engine.step()
    reported = engine.get_global_grad_norm()
    return float(reported) if reported is not None else norm


def export_weights(engine, bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The trainer's full weights as buckets of (HF name, tensor), never the whole model at once.

    Under ZeRO-3 each bucket's shards are gathered (all ranks take part), copied out, and released.
    `engine`: a DeepSpeed engine, or a plain module (check-drift without DeepSpeed).
    """
    import deepspeed

    module = getattr(engine, "module", engine)
    params = list(module.named_parameters())
    zero3 = any(hasattr(p, "ds_id") for _, p in params)
    bucket, size = [], 0
    for name, p in params:
        numel = p.ds_numel if zero3 else p.numel()
        bucket.append((name, p))
        size += numel * p.element_size()
        if size >= bucket_bytes:
            yield _gather(bucket, zero3, deepspeed)
            bucket, size = [], 0
    if bucket:
        yield _gather(bucket, zero3, deepspeed)


def _gather(bucket, zero3: bool, deepspeed) -> list[tuple[str, torch.Tensor]]:
    if not zero3:
        return [(n, p.detach()) for n, p in bucket]
    with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
        return [(n, p.detach().clone()) for n, p in bucket]


@dataclass
class RunSetup:
    """What every training loop starts from (grpo.py, sft.py)."""

    rank: int
    world: int
    processor: object
    banned: list[int]  # token ids never sampled (image placeholders)
    policy: object  # the DeepSpeed engine
    dev: torch.device
    start: int  # first step to run (after --resume: the checkpoint's step)
    state: dict  # the checkpoint's client state ({} on a fresh run)
    log: object  # runs.MetricsLog on rank 0, else None

    def end_step(self, recipe, metrics: dict, on_step=None) -> None:
        """Checkpoint when due (all ranks), log the step's metrics (rank 0), report progress."""
        from . import runs

        step, tr = metrics["step"], recipe.trainer
        if (tr.save_every and step % tr.save_every == 0) or (step == tr.steps and tr.save_final):
            runs.save_checkpoint(self.policy, self.processor, recipe.run_dir, step,
                                 {"step": step, "rng": runs.rng_state()}, self.rank)
        if self.log:
            self.log.write(metrics)
        if on_step and self.rank == 0:
            on_step(metrics)


def setup_run(recipe, resume: bool) -> RunSetup:
    """Distributed init, seeds, processor, the DeepSpeed policy, --resume, the run directory and its log."""
    import yaml

    from . import runs
    from .engines import placeholder_token_ids
    from .render import load_processor

    tr, a = recipe.trainer, recipe.algorithm
    rank, world = init_distributed()
    seed_everything(tr.seed + rank)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    processor = load_processor(recipe.model.path)
    total = tr.steps * (a.ppo_epochs if a.name == "grpo" else 1)  # optimizer steps, for the lr schedule
    policy = build_engine(recipe.model.path, tr.lr, tr.weight_decay, tr.warmup_steps, tr.zero_stage, tr.offload,
                          tr.grad_clip, recipe.model.dtype, recipe.model.gradient_checkpointing, total, tr.lr_schedule,
                          tr.zero3_persistence_threshold, recipe.model.attention)
    ckpt = runs.latest_checkpoint(recipe.run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {recipe.run_dir}/checkpoints")
    state = runs.load_checkpoint(policy, ckpt) if ckpt else {}
    if state.get("rng"):
        runs.set_rng_state(state["rng"])
    start = state.get("step", 0)
    log = None
    if rank == 0:
        (recipe.run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        log = runs.MetricsLog(recipe.run_dir, start if ckpt else None, recipe.run.tensorboard, recipe.run.wandb)
    return RunSetup(rank, world, processor, placeholder_token_ids(processor), policy, device(), start, state, log)
