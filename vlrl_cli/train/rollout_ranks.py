"""Rollouts on their own ranks: some ranks (GPUs) only generate, the others only train, and the engine works on
step k+1's rollouts while the trainers update on step k's.

`rollout.engine_ranks: k` puts the rollout engine on the last k of the run's ranks; the first ones train, as
today's colocated ranks do (DeepSpeed, ZeRO, their own process group: nothing there knows the engine ranks
exist). `rollout.max_staleness: s` lets the engine generate step k's rollouts with the weights of step k - s
(the weights after k - s updates): s = 0 is on-policy (the engine waits for every update), s = 1 overlaps
generation with training. The engine's log-probs are the behaviour policy; the trainer's truncated importance
weights (algorithm.mismatch) correct for the staleness, and every step logs its `rollout_staleness`.

How the ranks talk (torch.distributed, no files): every rank joins one TCP store (DeepSpeed's launcher's
MASTER_ADDR/MASTER_PORT); the trainers make their default process group from it, with the trainers alone in
it, and two more groups join trainers and engine ranks:
  * weights: trainer 0 and the engine ranks (NCCL on GPUs, gloo on the CPU). After each update trainer 0
    broadcasts the weights in buckets (a JSON header of names, shapes and dtypes, then one flat byte buffer);
    under ZeRO-3 every trainer takes part in gathering them. A LoRA policy sends its merged weights.
  * rollouts: every rank (gloo, CPU tensors). Each engine rank sends each of its trainers that trainer's
    trajectories, serialised with torch.save and read back with weights_only=True (tensors, numbers, strings,
    lists and dicts: nothing is unpickled).

The schedule, with s = max_staleness. Engine rank: before generating step k it takes every weight version up
to k - s; it sends without waiting (isend), so it can run s steps ahead. Trainer: receive step k's rollouts,
train, then (if a later generation needs them) broadcast the new weights. A broadcast waits only for the
engine to finish the generation it is in, which the trainer would wait for next anyway: there is no cycle of
waits, whatever s is.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import time
from dataclasses import dataclass, fields

import torch

from ..errors import UserError

TIMEOUT = datetime.timedelta(hours=2)  # a long generation or update must not trip the groups' timeout


@dataclass
class Placement:
    """Which ranks train and which generate, and this process's part."""

    rank: int  # in the whole run (the launcher's RANK)
    world: int  # every rank of the run
    engine_ranks: int  # the last this many ranks generate

    @property
    def trainers(self) -> int:
        return self.world - self.engine_ranks

    @property
    def is_engine(self) -> bool:
        return self.rank >= self.trainers

    def engine_for(self, trainer: int) -> int:
        """The engine rank that generates trainer `trainer`'s rollouts."""
        return self.trainers + trainer % self.engine_ranks

    def served_by(self, engine_rank: int) -> list[int]:
        """The trainers an engine rank generates for."""
        return [t for t in range(self.trainers) if self.engine_for(t) == engine_rank]


def check_placement(engine_ranks: int, world: int) -> None:
    """Refuses a split that leaves no rank to train, or an engine rank with no trainer to serve."""
    if engine_ranks >= world:
        raise UserError(f"rollout.engine_ranks is {engine_ranks} but the run has {world} rank(s): no rank is left to "
                        f"train; run with --gpus {engine_ranks + 1} or more (--nprocs on the CPU), or set "
                        "rollout.engine_ranks 0 (the engine on every training rank)")
    if engine_ranks > world - engine_ranks:
        raise UserError(f"rollout.engine_ranks is {engine_ranks} but only {world - engine_ranks} of the {world} ranks "
                        f"train: each engine rank serves at least one trainer; set rollout.engine_ranks "
                        f"{world // 2} or less")


def placement_for(engine_ranks: int) -> Placement:
    """This process's placement from the launcher's environment; refuses a placement check_placement refuses."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    check_placement(engine_ranks, world)
    return Placement(rank, world, engine_ranks)


@dataclass
class Bridge:
    """The two groups between trainers and engine ranks (None where this rank is not a member)."""

    placement: Placement
    weights: object | None  # trainer 0 (index 0) and the engine ranks
    rollouts: object  # every rank, by its run rank
    device: torch.device  # where the weight buffers live (the weights group's backend needs them there)


def connect(placement: Placement) -> Bridge:
    """Join the run's store; trainers get their own default process group (DeepSpeed's world), and every rank
    the two bridge groups. Engine ranks on a GPU see only their own card (their engine's device 0)."""
    import torch.distributed as dist

    from .launch import free_port

    p = placement
    on_gpu = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu and p.is_engine:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local % len(ids)]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # a one-GPU engine of its own
    host = os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT") or free_port())
    store = dist.TCPStore(host, port, p.world, p.rank == 0, timeout=TIMEOUT)
    backend = "nccl" if on_gpu else "gloo"
    if not p.is_engine:
        os.environ.update(RANK=str(p.rank), WORLD_SIZE=str(p.trainers))
        os.environ.setdefault("LOCAL_RANK", str(local))
        if on_gpu:
            torch.cuda.set_device(local)
        dist.init_process_group(backend, store=dist.PrefixStore("trainers/", store), rank=p.rank,
                                world_size=p.trainers, timeout=TIMEOUT)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    members = [0] + list(range(p.trainers, p.world))
    weights = None
    if p.rank in members:
        wstore = dist.PrefixStore("weights/", store)
        idx, size = members.index(p.rank), len(members)
        weights = (dist.ProcessGroupNCCL(wstore, idx, size) if on_gpu else
                   dist.ProcessGroupGloo(wstore, idx, size, TIMEOUT))
    rollouts = dist.ProcessGroupGloo(dist.PrefixStore("rollouts/", store), p.rank, p.world, TIMEOUT)
    return Bridge(p, weights, rollouts, device)


# --- weights: trainer 0 -> engine ranks -----------------------------------------------------------------


def _broadcast(group, t: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    group.broadcast([t], opts).wait()


def _send_blob(group, data: bytes, device) -> None:
    _broadcast(group, torch.tensor([len(data)], dtype=torch.int64, device=device))
    _broadcast(group, torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device))


def _recv_blob(group, device) -> bytes:
    n = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(group, n)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    _broadcast(group, buf)
    return buf.cpu().numpy().tobytes()


def send_weights(bridge: Bridge, policy, version: int, changed_only: bool = True) -> int:
    """Every trainer calls this (ZeRO-3 gathers on all of them); trainer 0 broadcasts the buckets. The engine
    ranks never sleep, so they keep every weight training cannot change: after the start only the rest goes
    (with LoRA, the adapted layers merged). Returns the bytes sent (0 on other trainers)."""
    from .weight_sync import export_weights

    sent = 0
    for bucket in export_weights(policy, changed_only=changed_only):
        if bridge.weights is None:
            continue
        header = [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in bucket]
        _send_blob(bridge.weights, json.dumps({"version": version, "tensors": header}).encode(), bridge.device)
        flat = torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for _, t in bucket])
        _broadcast(bridge.weights, flat.to(bridge.device))
        sent += flat.numel()
    if bridge.weights is not None:
        _send_blob(bridge.weights, json.dumps({"version": version, "done": True}).encode(), bridge.device)
    return sent


def receive_weights(bridge: Bridge, engine) -> int:
    """An engine rank takes the next weight version into its engine (bucket by bucket); returns the version."""
    while True:
        head = json.loads(_recv_blob(bridge.weights, bridge.device))
        if head.get("done"):
            return int(head["version"])
        specs = head["tensors"]
        sizes = [torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dt)).element_size()
                 for _, shape, dt in specs]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=bridge.device)
        _broadcast(bridge.weights, flat)
        bucket, at = [], 0
        for (name, shape, dt), n in zip(specs, sizes):
            bucket.append((name, flat[at:at + n].view(getattr(torch, dt)).view(shape)))
            at += n
        engine.update_weights(bucket)


# --- rollouts: engine rank -> trainer ---------------------------------------------------------------------


def _plain(x):
    """A value torch.load(weights_only=True) reads back: tensors, numbers, strings, None, lists and dicts."""
    if isinstance(x, torch.Tensor) or x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item"):  # numpy scalars in an environment's info
        return x.item()
    return str(x)


def pack_trajectories(trajs: list, meta: dict) -> bytes:
    """A step's trajectories (and what the engine rank says of them) as bytes."""
    def seq(s):
        d = {f.name: getattr(s, f.name) for f in fields(s) if f.name != "earlier"}
        if hasattr(s, "earlier"):
            d["earlier"] = [seq(e) for e in s.earlier]
        return _plain(d)

    buf = io.BytesIO()
    torch.save({"meta": _plain(meta), "trajs": [seq(t) for t in trajs]}, buf)
    return buf.getvalue()


def unpack_trajectories(data: bytes) -> tuple[list, dict]:
    from ..rollout.episodes import Sequence, Trajectory

    obj = torch.load(io.BytesIO(data), weights_only=True)
    trajs = []
    for d in obj["trajs"]:
        d["earlier"] = [Sequence(**e) for e in d.get("earlier", [])]
        trajs.append(Trajectory(**d))
    return trajs, obj["meta"]


def send_rollouts(bridge: Bridge, trainer: int, step: int, data: bytes) -> list:
    """Start sending a step's rollouts to a trainer; returns the pending sends (wait on them before exiting)."""
    size = torch.tensor([len(data)], dtype=torch.int64)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return [(bridge.rollouts.send([size], trainer, 2 * step), size),
            (bridge.rollouts.send([buf], trainer, 2 * step + 1), buf)]  # the tensors live until the wait


def receive_rollouts(bridge: Bridge, step: int) -> tuple[list, dict]:
    src = bridge.placement.engine_for(bridge.placement.rank)
    size = torch.zeros(1, dtype=torch.int64)
    bridge.rollouts.recv([size], src, 2 * step).wait()
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    bridge.rollouts.recv([buf], src, 2 * step + 1).wait()
    return unpack_trajectories(buf.numpy().tobytes())


def check_staleness(step: int, version: int, max_staleness: int) -> int:
    """Step `step` (0-based) trains on rollouts of weight version `version` (updates applied): at most
    `max_staleness` behind, or the run stops (the bound is a promise, not a hint)."""
    stale = step - version
    if stale < 0 or stale > max_staleness:
        raise RuntimeError(f"step {step + 1}'s rollouts came from the weights after {version} update(s): "
                           f"{stale} behind, outside rollout.max_staleness {max_staleness}")
    return stale


def weights_needed(step: int, steps: int, max_staleness: int) -> bool:
    """Whether the weights after update `step + 1` are sent: some generation still to come uses them."""
    return step + 1 + max_staleness < steps


# --- the engine rank's loop -------------------------------------------------------------------------------


def run_engine_rank(recipe, placement: Placement) -> None:
    """What an engine rank does for the whole run: generate each step's rollouts for its trainers with weights
    at most rollout.max_staleness updates old, and send them."""
    from ..data.records import load_records
    from ..model.loading import load_processor
    from ..rollout.episodes import run_episodes
    from .distributed import seed_everything
    from .grpo import rollout_engine, step_episodes, step_sampling

    r, tr = recipe.rollout, recipe.trainer
    bridge = connect(placement)
    trainers = placement.served_by(placement.rank)
    seed_everything(tr.seed + placement.rank)
    processor = load_processor(recipe.model.path)
    records = load_records(recipe.data.train)
    engine = rollout_engine(recipe, processor, trainers[0], records)
    # where the trainers start (a resumed run: after its checkpoint's updates, with those weights)
    start = json.loads(_recv_blob(bridge.weights, bridge.device))["start"]
    version = receive_weights(bridge, engine) if start else 0
    engine.wake()
    pending = []  # (step, work, buffer) of sends not yet known to be received
    for step in range(start, tr.steps):
        while version < step - r.max_staleness:
            version = receive_weights(bridge, engine)
        # weights after update k mean the trainers have taken step k - 1's rollouts: those sends are done, and
        # their buffers (a step's images) are freed instead of living for the whole run
        for sent_step, work, _ in pending:
            if sent_step < version:
                work.wait()
        pending = [x for x in pending if x[0] >= version]
        for t in trainers:
            clock = time.perf_counter()
            groups = step_episodes(recipe, records, processor, step, t, placement.trainers)
            times: dict = {}
            trajs = run_episodes(engine, groups, step_sampling(recipe, step, t), r.max_turns, times)
            meta = {"step": step, "version": version, "engine_s": times.get("engine_s", 0.0),
                    "generate_s": time.perf_counter() - clock}
            sends = send_rollouts(bridge, t, step, pack_trajectories(trajs, meta))
            pending += [(step, work, buf) for work, buf in sends]
    for _, work, _ in pending:
        work.wait()


def start_engine_ranks(bridge: Bridge, policy, start: int) -> None:
    """Trainers' side of the start: tell the engine ranks where the run starts and, resumed, send its weights."""
    if bridge.weights is not None:
        _send_blob(bridge.weights, json.dumps({"start": start}).encode(), bridge.device)
    if start:  # the engine loaded the model's own weights; a resumed run's frozen ones are those too
        send_weights(bridge, policy, start)
