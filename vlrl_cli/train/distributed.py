"""Processes and ranks: the process group (DeepSpeed's launcher or a one-rank world), seeds, the device,
and sums of metrics over ranks."""

from __future__ import annotations

import os
import random
from typing import Callable

import numpy as np
import torch


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Single process: fake a one-rank world so DeepSpeed runs unchanged."""
    import deepspeed

    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    own_port = "MASTER_PORT" not in os.environ
    if own_port:
        from .launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())  # two runs on one machine must not collide
    if not torch.cuda.is_available():
        skip_cpu_shm_op()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    if own_port:  # our store holds it now; a process started from this one must not inherit (and reuse) it
        os.environ.pop("MASTER_PORT")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    share_cpu_threads()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


SHM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_op() -> None:
    """On the CPU, DeepSpeed's process group JIT-compiles a shared-memory all-reduce op at its first start in
    an environment: measured on the 2-core dev machine, a one-process SFT run took 39 s the first time and 9 s
    after, and a machine without a C++ compiler cannot start at all. vlrl's CPU runs (tiny models, one
    process, or two ranks in the tests) gain nothing from it; without it DeepSpeed reduces through gloo.
    DeepSpeed reads the op's availability from `deepspeed.ops.__compatible_ops__`, a dict it keeps for
    such edits."""
    import deepspeed.ops

    try:
        deepspeed.ops.__compatible_ops__[SHM_OP] = False
    except (AttributeError, TypeError):  # a DeepSpeed without the table has no such op to build
        pass


def share_cpu_threads() -> int:
    """Each of this machine's ranks gets its share of the CPU cores for PyTorch's CPU work (rendering,
    batches), unless OMP_NUM_THREADS says otherwise. Without it every rank runs as many threads as the
    machine has cores: measured on 2 x H200 (32 cores), the CPU-side phases of a GRPO step (building the
    micro-batches, the rest of generate) took twice as long with two ranks as with one. DeepSpeed's
    launcher sets OMP_NUM_THREADS only with --bind_cores_to_rank. Returns the threads set (0: unchanged)."""
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if local <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return 0
    threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")


def all_ranks(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or max) each value over all ranks; unchanged in a one-process run."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def loss_normalisers(counts: dict[str, float]) -> dict[str, float]:
    """What each rank divides its loss sums by: the count over all ranks, divided by the number of ranks.

    DeepSpeed averages the ranks' gradients, so this makes the result the whole batch's mean (per token,
    per sequence), as one rank with the whole batch would compute it. A rank's own count would instead
    give every rank equal weight however many tokens it trained on (ranks differ: dropped groups, prompts
    over the limit, response lengths)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {k: v / world for k, v in all_ranks(counts).items()}


def equal_micro_batches(micro: list[list], filler: Callable[[], object]) -> tuple[list[list], list[float]]:
    """The rank's micro-batches, padded to as many as the rank with the most has, and their loss weights
    (1, and 0 for the added ones, each holding one `filler()` item).

    ZeRO-2 and -3 reduce gradients inside every backward, so every rank must run the same number of
    forward/backward passes in a step; counts differ when a rank's prompts are over the limit, groups were
    dropped, or sequences were packed (ranks with different counts crashed or aborted on a collective)."""
    fillers = int(all_ranks({"n": len(micro)}, op="max")["n"]) - len(micro)
    item = filler() if fillers else None  # built once (SFT's renders prompts), shared by every filler
    return micro + [[item] for _ in range(fillers)], [1.0] * len(micro) + [0.0] * fillers
