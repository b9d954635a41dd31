"""Trainer -> rollout engine: the policy's full weights in buckets, and the sync after every update."""

from __future__ import annotations

import time
from typing import Iterator

import torch


def export_weights(policy, bucket_bytes: int = 256 << 20, changed_only: bool = False
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The trainer's full weights as buckets of (HF name, tensor), never the whole model at once.

    changed_only: only the weights training can change (LoRA: the adapted layers, merged; frozen weights are
    left out), for an engine that keeps what it holds between updates (an engine rank's, which never sleeps).
    Under ZeRO-3 each bucket's shards are gathered (all ranks take part), copied out, and released.
    `policy`: a DeepSpeed engine, or a plain module (check-drift without DeepSpeed).
    """
    import deepspeed

    from .lora import is_lora, merged_named_parameters

    module = getattr(policy, "module", policy)
    if is_lora(module):  # the engine gets W + scale * B A under the plain model's names
        yield from _buckets(merged_named_parameters(module, changed_only), bucket_bytes)
        return
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not changed_only]
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


def _buckets(named, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket, size = [], 0
    for name, t in named:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _gather(bucket, zero3: bool, deepspeed) -> list[tuple[str, torch.Tensor]]:
    if not zero3:
        return [(n, p.detach()) for n, p in bucket]
    with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
        return [(n, p.detach().clone()) for n, p in bucket]


def sync_weights(policy, engine) -> float:
    """Push the policy's weights into the rollout engine (which drops every cache of old results); seconds."""
    t = time.perf_counter()
    for bucket in export_weights(policy):
        engine.update_weights(bucket)
    return time.perf_counter() - t
