"""GPU performance at a real model size, run on the device (see README, "Performance").

Random weights with the released Qwen2.5-VL-3B-Instruct configuration (speed does not depend on weight
values), 448x448 colour images (256 image tokens each), fixed-length generation (EOS ignored).

    python bench/gpu_perf.py build   --out /tmp/q3b                  # the model (bf16, on the GPU)
    python bench/gpu_perf.py data    --out /tmp/bench-data            # 512 image prompts
    python bench/gpu_perf.py rollout --model /tmp/q3b --data ... --engine vllm --prompts 256 --json r.json
    python bench/gpu_perf.py sync    --model /tmp/q3b --json s.json --profile prof.txt
    python bench/gpu_perf.py recipe  --model /tmp/q3b --data ... --out step.yaml   # then: vlrl train step.yaml
    python bench/gpu_perf.py train-profile --model /tmp/q3b --data ... --stage 3 --micro-batch 8 --profile p.txt
    python bench/gpu_perf.py summarize --dir $OUT --out bench/results/gpu.json

Each command prints one JSON line and writes it to --json; `summarize` joins them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def device_name() -> str:
    import torch

    return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"


def emit(result: dict, path: str | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def cmd_build(a):
    from vlrl_cli.model.tiny import build_real_size_model

    t = time.perf_counter()
    build_real_size_model(a.out, a.size)
    emit({"built": a.out, "size": a.size, "seconds": time.perf_counter() - t}, None)


def cmd_data(a):
    from vlrl_cli.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source="colors", out=Path(a.out), workers=8, split="train=1.0",
                           source_opts={"rows": a.rows, "image_size": 448}, overwrite=True))
    print(json.dumps({"data": a.out}))


def requests_for(model: str, data: str, prompts: int):
    from vlrl_cli.rollout.engines import GenRequest
    from vlrl_cli.data.records import load_records
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.model.render import render_prompt

    processor = load_processor(model)
    records = load_records(data, prompts)
    reqs = []
    for r in records:
        rp = render_prompt(processor, r["prompt"])
        reqs.append(GenRequest(rp.input_ids, rp.tensors, 1, r["prompt"]))
    return processor, reqs


def cmd_rollout(a):
    """Generated tokens/s of one engine on the same requests (EOS ignored: every sequence is --tokens long).

    --repeats R: R timed calls, each on its own --prompts prompts (a GRPO step's prompts are new every step,
    and the prefix cache must not serve a repeat); `seconds` is their median, every call is in `calls_s`.
    One call alone is noisy on the H200: 2.75 s and 3.80 s for the same 32 x 8 x 256 in one lease."""
    import statistics

    import torch

    from vlrl_cli.rollout.engines import Sampling, make_engine

    processor, reqs = requests_for(a.model, a.data, a.prompts * a.repeats + 2)
    for r in reqs:
        r.n = a.n
    engine = make_engine(a.engine, a.model, processor, dtype="bfloat16", gpu_memory_utilization=a.gpu_mem)
    s = Sampling(1.0, 1.0, a.tokens, 0, ignore_eos=True)
    engine.generate(reqs[-2:], Sampling(1.0, 1.0, 8, 0, ignore_eos=True))  # warm-up: kernels, graphs
    calls, tokens = [], 0
    for i in range(a.repeats):
        batch = reqs[i * a.prompts:(i + 1) * a.prompts]
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = engine.generate(batch, s)
        torch.cuda.synchronize()
        calls.append(time.perf_counter() - t)
        tokens = sum(len(g.token_ids) for gens in out for g in gens)
    dt = statistics.median(calls)
    emit({"engine": a.engine, "device": device_name(), "prompts": a.prompts, "samples_per_prompt": a.n,
          "tokens_per_sequence": a.tokens, "prompt_tokens_mean": sum(len(r.input_ids) for r in reqs) / len(reqs),
          "generated_tokens": tokens, "seconds": dt, "calls_s": [round(c, 4) for c in calls],
          "tokens_per_s": tokens / dt}, a.json)


def cmd_sync(a):
    """ZeRO-3 trainer -> colocated vLLM engine: gather each bucket, load_weights, clear caches."""
    import torch

    from vlrl_cli.train.distributed import init_distributed
    from vlrl_cli.rollout.engines import Sampling
    from vlrl_cli.rollout.engines.vllm import VLLMEngine
    from vlrl_cli.train.policy import build_policy
    from vlrl_cli.train.weight_sync import export_weights
    from vlrl_cli.model.loading import load_processor

    init_distributed()
    policy = build_policy(a.model, lr=1e-6, weight_decay=0.0, warmup=0, stage=3, offload=False, grad_clip=1.0,
                          dtype="bfloat16", gradient_checkpointing=True)
    processor = load_processor(a.model)
    engine = VLLMEngine(a.model, processor, dtype="bfloat16", gpu_memory_utilization=a.gpu_mem)
    engine.sleep()
    n_bytes = sum(p.ds_numel * p.element_size() for p in policy.module.parameters())

    def timed_sync():
        gather = load = 0.0
        buckets = 0
        torch.cuda.synchronize()
        t = time.perf_counter()
        it = export_weights(policy)
        while True:
            t0 = time.perf_counter()
            bucket = next(it, None)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            if bucket is None:
                break
            engine.update_weights(bucket)
            torch.cuda.synchronize()
            gather, load, buckets = gather + t1 - t0, load + time.perf_counter() - t1, buckets + 1
        return time.perf_counter() - t, gather, load, buckets

    timed_sync()  # warm-up
    runs = [timed_sync() for _ in range(3)]
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_sync()
        Path(a.profile).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    engine.wake()
    _, reqs = requests_for(a.model, a.data, 2)
    gens = engine.generate(reqs, Sampling(1.0, 1.0, 8, 0))  # the engine still generates after the loads
    secs = sorted(r[0] for r in runs)
    emit({"device": device_name(), "param_bytes": n_bytes, "seconds": secs[len(secs) // 2], "seconds_all": secs,
          "gather_seconds": runs[-1][1], "load_seconds": runs[-1][2], "buckets": runs[-1][3],
          "gb_per_s": n_bytes / 1e9 / secs[len(secs) // 2], "generated_after_sync": len(gens[0][0].token_ids)}, a.json)


def mark_modules(model) -> list:
    """Profiler ranges `module::NAME` around the forward of the vision tower, the language model and the head
    (the first module of each name), so a profile says how the forward's time splits between them."""
    import torch

    found = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("visual", "vision_tower", "language_model", "lm_head") and leaf not in found:
            found[leaf] = mod
    hooks = []
    for leaf, mod in found.items():
        open_ranges = []

        def enter(m, args, leaf=leaf, open_ranges=open_ranges):
            r = torch.profiler.record_function(f"module::{leaf}")
            r.__enter__()
            open_ranges.append(r)

        def leave(m, args, out, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        hooks += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
    return hooks


def cmd_train_profile(a):
    """Where a GRPO step's training time goes: forward + backward of real rollout-shaped micro-batches.

    Builds the trainer as `vlrl train` does (ZeRO stage, bf16, gradient checkpointing), feeds --micro-batches
    micro-batches of --micro-batch sequences (a real rendered image prompt + --tokens response tokens),
    times each, and writes the torch-profiler table of one. Compare --stage 2 / 3 and --micro-batch 8 / 16.
    """
    import torch

    from vlrl_cli.train.batches import make_batch, sequence_logprobs
    from vlrl_cli.train.distributed import device, init_distributed
    from vlrl_cli.train.policy import backward_step, build_policy
    from vlrl_cli.rollout.episodes import Sequence

    init_distributed()
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    from vlrl_cli.train.recipe import LoraCfg

    lora = LoraCfg(rank=a.lora_rank, alpha=2 * a.lora_rank) if a.lora_rank else None
    policy = build_policy(a.model, lr=1e-6, weight_decay=0.0, warmup=0, stage=a.stage, offload=False,
                          grad_clip=1.0, dtype=dtype, gradient_checkpointing=not a.no_checkpointing,
                          persistence_threshold=a.persistence, attention=a.attention, lora=lora,
                          compile_blocks=a.compile)
    policy.train()  # as in a GRPO step: gradient checkpointing is only active in train mode
    processor, reqs = requests_for(a.model, a.data, a.micro_batch)
    from vlrl_cli.rollout.engines import placeholder_token_ids

    special = set(placeholder_token_ids(processor))  # a sampled image placeholder would need an image
    ordinary = [i for i in range(len(processor.tokenizer)) if i not in special]
    g = torch.Generator().manual_seed(0)
    seqs = []
    for r in reqs:
        resp = [ordinary[i] for i in torch.randint(0, len(ordinary), (a.tokens,), generator=g).tolist()]
        n = len(r.input_ids) + a.tokens
        seqs.append(Sequence(r.input_ids + resp, [0] * len(r.input_ids) + [1] * a.tokens, [0.0] * n, r.tensors))
    batch = make_batch(seqs, processor, device())
    banned = []

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def one(last: bool) -> float:
        sync()
        t = time.perf_counter()
        lp = sequence_logprobs(policy, batch, 1.0, banned, only=batch.loss_mask)
        loss = -(lp * batch.loss_mask).sum() / batch.loss_mask.sum()
        backward_step(policy, loss, last)
        sync()
        return time.perf_counter() - t

    def score() -> float:  # the no-grad forward that gives the old log-probs
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            sequence_logprobs(policy, batch, 1.0, banned, only=batch.loss_mask)
        sync()
        return time.perf_counter() - t

    scores = [score() for _ in range(2)]
    times = [one(k == a.micro_batches - 1) for k in range(a.micro_batches)]
    t = time.perf_counter()
    policy.step()
    step_s = time.perf_counter() - t
    busy = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        hooks = mark_modules(policy.module)
        with profile(activities=acts) as prof:
            wall = one(True)
        for h in hooks:
            h.remove()
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        events = prof.key_averages()
        # GPU busy time: the sum of kernels' own time; against the wall time it says whether the GPU waits
        from torch.autograd import DeviceType

        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        busy = {"wall_s": wall, "gpu_kernel_s": gpu_us / 1e6, "gpu_busy_fraction": gpu_us / 1e6 / wall,
                "kernel_launches": sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC")),
                # forward only (the backward runs outside the ranges), kernels' time inside each marked module
                "forward_s": {e.key.removeprefix("module::"): (e.device_time_total or e.cpu_time_total) / 1e6
                              for e in events if e.key.startswith("module::")}}
        Path(a.profile).write_text(json.dumps(busy) + "\n" + events.table(sort_by=sort, row_limit=40)
                                   + "\n\nBy the host's own time (what keeps the CPU from running ahead of the GPU):\n"
                                   + events.table(sort_by="self_cpu_time_total", row_limit=40))
    steady = times[1:] or times
    tokens = sum(len(x.token_ids) for x in seqs)
    emit({"device": device_name(), "stage": a.stage, "persistence": a.persistence, "attention": a.attention,
          "compile": a.compile, "gradient_checkpointing": not a.no_checkpointing, "lora_rank": a.lora_rank,
          "micro_batch": a.micro_batch, "sequence_tokens": tokens // len(seqs), "all_micro_batch_seconds": times,
          "micro_batch_seconds": sum(steady) / len(steady), "first_micro_batch_seconds": times[0],
          "score_micro_batch_seconds": scores[-1], "profiled": busy,
          "optimizer_step_seconds": step_s, "train_tokens_per_s": tokens / (sum(steady) / len(steady)),
          "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}, a.json)


def cmd_pack(a):
    """Packed vs padded micro-batches at the same token budget: forward + backward of --seqs
    rollout-shaped sequences (a real image prompt + a response of 16..1024 random tokens, seeded), in the same
    order. Padded: budget // (prompt + max response) sequences per micro-batch, so its worst micro-batch fits
    the budget too; packed: trainer.pack_tokens = budget. Reports real tokens per second and peak memory."""
    import random

    import torch

    from vlrl_cli.train.batches import make_batch, micro_batches, sequence_logprobs
    from vlrl_cli.train.distributed import device, init_distributed
    from vlrl_cli.rollout.engines import placeholder_token_ids
    from vlrl_cli.train.policy import backward_step, build_policy
    from vlrl_cli.rollout.episodes import Sequence

    init_distributed()
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    policy = build_policy(a.model, lr=1e-6, weight_decay=0.0, warmup=0, stage=a.stage, offload=False, grad_clip=1.0,
                          dtype=dtype, gradient_checkpointing=True, packed=not a.sdpa_mask, compile_blocks=a.compile)
    policy.train()
    from vlrl_cli.model.image_sharing import share_repeated_images, shares_images

    if a.no_share_images:  # the vision tower encodes every copy of a repeated image (as before f3e5f37)
        share_repeated_images(policy.module, enabled=False)
    processor, reqs = requests_for(a.model, a.data, -(-a.seqs // a.group))
    reqs = [r for r in reqs for _ in range(a.group)][:a.seqs]  # a GRPO group: n responses to one prompt image
    special = set(placeholder_token_ids(processor))
    ordinary = [i for i in range(len(processor.tokenizer)) if i not in special]
    rng = random.Random(0)
    seqs = []
    for r in reqs:
        k = rng.randint(a.min_tokens, a.max_tokens)
        resp = [rng.choice(ordinary) for _ in range(k)]
        seqs.append(Sequence(r.input_ids + resp, [0] * len(r.input_ids) + [1] * k, [0.0] * (len(r.input_ids) + k), r.tensors))
    lengths = [len(x.token_ids) for x in seqs]
    per_padded = max(1, a.budget // (len(reqs[0].input_ids) + a.max_tokens))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    result = {"device": device_name(), "model": a.model, "sequences": len(seqs), "group": a.group,
              "share_images": shares_images(policy.module), "tokens": sum(lengths),
              "budget_tokens": a.budget, "response_tokens": [a.min_tokens, a.max_tokens],
              "packed_attention": "sdpa + block mask" if a.sdpa_mask else "varlen flash (model.attention.packed_text_attention)"}
    for mode in ("padded", "packed", "padded", "packed"):  # each twice: the first pass warms up
        groups = micro_batches(lengths, per_padded, a.budget if mode == "packed" else 0)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        computed = 0
        for k, g in enumerate(groups):
            b = make_batch([seqs[i] for i in g], processor, device(), packed_for=policy if mode == "packed" else None)
            computed += b.positions[1]
            lp = sequence_logprobs(policy, b, 1.0, [], only=b.loss_mask)
            backward_step(policy, -(lp * b.loss_mask).sum() / b.loss_mask.sum(), k == len(groups) - 1)
        sync()
        secs = time.perf_counter() - t
        policy.zero_grad()
        result[mode] = {"seconds": secs, "micro_batches": len(groups), "computed_positions": computed,
                        "tokens_per_s": sum(lengths) / secs,
                        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}
    result["packing_speedup"] = result["packed"]["tokens_per_s"] / result["padded"]["tokens_per_s"]
    if a.profile:  # where each mode's time goes: one more pass of each under the profiler
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        for mode in ("padded", "packed"):
            groups = micro_batches(lengths, per_padded, a.budget if mode == "packed" else 0)
            with profile(activities=acts) as prof:
                sync()
                t = time.perf_counter()
                for k, g in enumerate(groups):
                    b = make_batch([seqs[i] for i in g], processor, device(), packed_for=policy if mode == "packed" else None)
                    lp = sequence_logprobs(policy, b, 1.0, [], only=b.loss_mask)
                    backward_step(policy, -(lp * b.loss_mask).sum() / b.loss_mask.sum(), k == len(groups) - 1)
                sync()
                wall = time.perf_counter() - t
            policy.zero_grad()
            result[mode]["profiled"] = kernel_summary(prof, wall)
            Path(f"{a.profile}_{mode}.txt").write_text(json.dumps(result[mode]["profiled"]) + "\n" + prof.key_averages().table(
                sort_by="cuda_time_total" if torch.cuda.is_available() else "cpu_time_total", row_limit=60))
    emit(result, a.json)


def kernel_summary(prof, wall: float) -> dict:
    """GPU busy time (the kernels' own time) against the wall time, and the launches: whether the GPU waits."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    gpu_s = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
    return {"wall_s": wall, "gpu_kernel_s": gpu_s, "gpu_busy_fraction": gpu_s / wall if wall else None,
            "kernel_launches": sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC"))}


def cmd_recipe(a):
    import yaml

    recipe = {
        "model": {"path": a.model, "dtype": "bfloat16", "gradient_checkpointing": not a.no_checkpointing,
                  "attention": a.attention, "compile": a.compile},
        "data": {"train": a.data, "max_prompt_tokens": 1024},
        "rollout": {"engine": "vllm", "n": 8, "prompts_per_step": a.prompts, "max_new_tokens": a.tokens,
                    "temperature": 1.0, "ignore_eos": True, "gpu_memory_utilization": a.gpu_mem,
                    "max_context_tokens": 4096},
        "algorithm": {"name": "grpo", "loss_agg": "token-mean", "mismatch": "tis"},
        "trainer": {"steps": a.steps, "lr": 1.0e-6, "micro_batch": a.micro_batch, "zero_stage": a.zero_stage, "save_final": False,
                    "eval_every": 0, "warmup_steps": 0, "offload": a.offload},
        "run": {"name": a.name, "dir": a.run_dir},
    }
    if a.grad_accum_fp32:
        recipe["trainer"]["grad_accum_fp32"] = True
    if a.lora_rank:
        recipe["model"]["lora"] = {"rank": a.lora_rank, "alpha": 2 * a.lora_rank}
    Path(a.out).write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(json.dumps({"recipe": a.out}))


H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM and H200: the same tensor cores, dense bf16 peak


def train_phase_mfu(metrics: list[dict], params: float, seconds: float) -> dict:
    """Model FLOPs utilisation of the training phase: 6 x parameters x tokens (forward 2, backward 4) over
    the phase's time and the GPU's dense bf16 peak. Tokens: every position of every trained sequence
    (prompt + response; padding excluded). The hardware figure adds the checkpointed recompute (+2)."""
    m = metrics[-1]
    tokens = m["trained_sequences"] * (m["prompt_len_mean"] + m["response_len_mean"])
    model_flops = 6 * params * tokens
    return {"formula": "6 * params * tokens / (time_train_s * 989e12)", "tokens": tokens, "params": params,
            "mfu": model_flops / seconds / H100_BF16_DENSE_FLOPS,
            "hfu_with_recompute": 8 * params * tokens / seconds / H100_BF16_DENSE_FLOPS}


def cmd_fit(a):
    """Join the fit runs (folders full3b, lora3b, lora7b of metrics.jsonl) into gpu.json's keys."""
    d = Path(a.dir)
    runs = {}
    for n in ("full3b", "lora3b", "lora7b", "full3b_m4", "lora3b_m32", "full3b_z1"):
        for path in (d / n / "metrics.jsonl", d / f"{n}.metrics.jsonl"):
            if path.exists():
                runs[n] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    steady = lambda rows, k: sum(r[k] for r in rows[1:]) / max(1, len(rows) - 1) if len(rows) > 1 else rows[0][k]  # noqa: E731
    res = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    where = {"device": a.device, "commit": a.commit, "command": "bash bench/device_runs.sh fit (see there)"}
    if "full3b" in runs:
        f = runs["full3b"]
        res["trainer_peak_gb_3b_h100"] = {**where, "value": max(r["trainer_mem_peak_gb"] for r in f),
                                          "engine_mem_gb": f[0]["engine_mem_gb"], "steps": f}
        t = steady(f, "time_train_s")
        res["train_phase_seconds_3b"] = {**where, "value": t, "note": "measured on the H100, not the H200 the target names"}
        res["train_phase_mfu_3b"] = {**where, **train_phase_mfu(f, 3.755e9, t)}
    if "full3b" in runs and "lora3b" in runs:
        full = steady(runs["full3b"], "time_train_s")
        res["lora_train_phase_ratio_3b"] = {
            **where, "value": steady(runs["lora3b"], "time_train_s") / full,
            "note": "same 256 sequences per step and the same micro-batch (8); LoRA's memory also allows micro-batch 32 "
                    "(value_micro_batch_32; a full fine-tune cannot fit it)",
            "value_micro_batch_32": steady(runs["lora3b_m32"], "time_train_s") / full if "lora3b_m32" in runs else None,
            "lora_steps": runs["lora3b"], "lora_steps_micro_batch_32": runs.get("lora3b_m32")}
    if "full3b_z1" in runs:  # ZeRO-1: the same step, gradients not copied into ZeRO-2's partition buffer
        z1, t1 = runs["full3b_z1"], steady(runs["full3b_z1"], "time_train_s")
        res["trainer_peak_gb_3b_h100"] = {**where, "commit": "3baffcd (trainer code as e732cd6 but curves.png)",
                                          "value": max(r["trainer_mem_peak_gb"] for r in z1), "zero_stage": 1,
                                          "engine_mem_gb": z1[0]["engine_mem_gb"], "steps": z1,
                                          "zero2": res["trainer_peak_gb_3b_h100"]}
        res["train_phase_seconds_3b"] = {**where, "value": t1, "zero_stage": 1, "zero2_value": res["train_phase_seconds_3b"]["value"],
                                         "note": "measured on the H100, not the H200 the target names"}
        res["train_phase_mfu_3b"] = {**where, "zero_stage": 1, **train_phase_mfu(z1, 3.755e9, t1)}
    if "full3b_m4" in runs:
        target = res["trainer_peak_gb_3b_h100"].get("zero2", res["trainer_peak_gb_3b_h100"])  # a ZeRO-2 run
        target["micro_batch_4"] = {"value": max(r["trainer_mem_peak_gb"] for r in runs["full3b_m4"]),
                                                           "steps": runs["full3b_m4"]}
    if "lora7b" in runs:
        r7 = runs["lora7b"]
        res["lora_7b_step_seconds"] = {**where, "value": steady(r7, "time_step_s"),
                                       "tokens_per_s_per_gpu": steady(r7, "tokens_per_s"), "steps": r7}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k].get("value", res[k].get("mfu")) for k in res if k in (
        "trainer_peak_gb_3b_h100", "train_phase_seconds_3b", "train_phase_mfu_3b", "lora_train_phase_ratio_3b", "lora_7b_step_seconds")}))


def step_summary(metrics_path: Path, gpus: int, skip: int = 1) -> dict:
    """Mean over the steps after the first (warm-up: CUDA graphs, allocator, first gather)."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    steady = rows[skip:] or rows
    mean = lambda k: sum(r[k] for r in steady) / len(steady)  # noqa: E731
    step_s = mean("time_step_s")
    gen_tokens = mean("tokens_per_s") * step_s
    all_tokens = gen_tokens * (1 + mean("prompt_len_mean") / max(mean("response_len_mean"), 1))
    return {"steps": len(rows), "steady_steps": len(steady), "gpus": gpus, "step_seconds": step_s,
            "first_step_seconds": rows[0]["time_step_s"], "step_seconds_all": [r["time_step_s"] for r in rows],
            "time_generate_s": mean("time_generate_s"), "time_score_s": mean("time_score_s"),
            "time_train_s": mean("time_train_s"), "time_sync_s": mean("time_sync_s"),
            "sync_fraction": mean("time_sync_s") / step_s, "response_len_mean": mean("response_len_mean"),
            "prompt_len_mean": mean("prompt_len_mean"),
            # per rank (metrics are rank 0's; every rank has the same batch shape)
            "generated_tokens_per_s_per_gpu": gen_tokens / step_s,
            "tokens_per_s_per_gpu": all_tokens / step_s,
            "trainer_peak_gpu_gb": max(r.get("trainer_mem_peak_gb", 0) for r in rows),
            "engine_mem_gb": max(r.get("engine_mem_gb", 0) for r in rows)}


def _steps(d: Path, name: str, gpus: int) -> dict | None:
    path = d / name / "metrics.jsonl"
    return step_summary(path, gpus) if path.exists() else None


def _per_step(run: dict | None, steady: bool) -> float | None:
    """A run's step seconds: the steady mean (steps after the first) or its first step."""
    if not run:
        return None
    return run["step_seconds"] if steady else run["first_step_seconds"]


def _run_of(seconds: list[float]) -> dict:
    """Step times of another tool's run, shaped like step_summary's."""
    steady = seconds[1:] or seconds
    return {"steps": len(seconds), "steady_steps": len(steady), "step_seconds": sum(steady) / len(steady),
            "first_step_seconds": seconds[0]}


def _has_steady(*runs) -> bool:
    return all(r and r["steady_steps"] < r["steps"] for r in runs)


def cmd_summarize(a):
    """Join one session's result files; parts not re-measured are kept from --previous (marked as such).

    Run folders (metrics.jsonl of `vlrl train`): step1 / step2 = ZeRO-3 on 1 / 2 GPUs, step1_z2 / step2_z2 =
    ZeRO-2. Ratios use steady steps (the mean after the first) where both sides have them, else first steps;
    every `*_basis` says which.
    """
    d = Path(a.dir)
    load = lambda name: json.loads((d / name).read_text()) if (d / name).exists() else None  # noqa: E731
    prev = json.loads(Path(a.previous).read_text()) if a.previous and Path(a.previous).exists() else {}
    vllm, hf, sync = load("rollout_vllm.json"), load("rollout_hf.json"), load("sync.json")
    carried = []
    if not (vllm and hf) and prev.get("rollout"):
        vllm, hf = prev["rollout"]["vllm"], prev["rollout"]["hf"]
        carried.append("rollout")
    if not sync and prev.get("sync"):
        sync = prev["sync"]
        carried.append("sync")
    one, two = _steps(d, "step1", 1), _steps(d, "step2", 2)
    one_z2, two_z2 = _steps(d, "step1_z2", 1), _steps(d, "step2_z2", 2)
    trl = load("trl.json")
    profiles = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("tp_*.json"))}

    # TRL on two clocks: ours (on_train_begin / on_step_end callbacks) and its own logged step_time
    trl_own = [x["step_time"] for x in (trl or {}).get("log_history", []) if x.get("step_time") is not None]
    trl_run = _run_of(trl["step_seconds_all"]) if trl else None
    trl_own_run = _run_of(trl_own) if trl_own else None
    steady = _has_steady(one, trl_run)

    def ratio(x, y, both_steady):
        xs, ys = _per_step(x, both_steady), _per_step(y, both_steady)
        return xs / ys if xs and ys else None

    # weak scaling: the same per-GPU batch on 2 GPUs; 1.0 = twice the tokens/s. ZeRO-3 where both ran, else ZeRO-2
    pair = (one, two, "ZeRO-3") if one and two else (one_z2, two_z2, "ZeRO-2")
    pair_steady = _has_steady(pair[0], pair[1])
    out = {
        "device": a.device or next((x["device"] for x in [*profiles.values(), vllm, sync] if x and x.get("device")), None),
        "runs": "bench/device_runs.sh (the commands), bench/results/gpu_runs/README.md (what ran where)",
        "model": "Qwen2.5-VL-3B-Instruct architecture, random bf16 weights",
        "carried_from_previous_session": carried,
        "rollout": {"vllm": vllm, "hf": hf},
        "rollout_speedup_vs_hf": vllm["tokens_per_s"] / hf["tokens_per_s"] if vllm and hf else None,
        "sync": sync,
        "sync_seconds_3b": sync["seconds"] if sync else None,
        "grpo_step_1gpu": one,
        "grpo_step_1gpu_zero2": one_z2,
        "step_seconds_3b": one["step_seconds"] if one else None,
        "tokens_per_s_per_gpu_3b": one["tokens_per_s_per_gpu"] if one else None,
        "sync_fraction_of_step": sync["seconds"] / one["step_seconds"] if sync and one else None,
        "trl": {k: v for k, v in trl.items() if k != "log_history"} | {"trl_reported_step_time": trl_own} if trl else None,
        "step_time_ratio_vs_trl": ratio(one, trl_run, steady),
        "step_time_ratio_vs_trl_reported": ratio(one, trl_own_run, _has_steady(one, trl_own_run)),
        "step_time_ratio_vs_trl_first_steps": ratio(one, trl_run, False),
        "step_time_ratio_vs_trl_zero2": ratio(one_z2, trl_run, _has_steady(one_z2, trl_run)),
        "step_time_ratio_vs_trl_basis": ("vlrl ZeRO-3 / TRL ZeRO-3, " + ("steady steps (mean after the first); TRL "
                                         "wall clock from on_train_begin / on_step_end" if steady else "first steps")),
        "grpo_step_2gpu": two,
        "grpo_step_2gpu_zero2": two_z2,
        "scaling_efficiency_2gpu": ratio(pair[0], pair[1], pair_steady),
        "scaling_efficiency_2gpu_basis": f"{pair[2]}: 1-GPU step / 2-GPU step, same per-GPU batch, "
                                         + ("steady steps" if pair_steady else "first steps"),
        "train_profile": profiles or prev.get("train_profile"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--size", default="qwen2_5_vl_3b")
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--rows", type=int, default=512)
    for name in ("rollout", "sync", "recipe", "train-profile"):
        s = sub.add_parser(name)
        s.add_argument("--attention", default="auto", help="model.attention: auto (vision grouped) | sdpa | ...")
        s.add_argument("--model", required=True)
        s.add_argument("--data", required=True)
        s.add_argument("--gpu-mem", type=float, default=0.35)
        s.add_argument("--json")
        s.add_argument("--tokens", type=int, default=256)
        s.add_argument("--prompts", type=int, default=256)
    sub.choices["rollout"].add_argument("--engine", default="vllm")
    sub.choices["rollout"].add_argument("--n", type=int, default=1, help="samples per prompt (a GRPO step's group size)")
    sub.choices["rollout"].add_argument("--repeats", type=int, default=1, help="timed calls, each on new prompts (median)")
    sub.choices["sync"].add_argument("--profile")
    tp = sub.choices["train-profile"]
    tp.add_argument("--stage", type=int, default=3)
    tp.add_argument("--micro-batch", type=int, default=8)
    tp.add_argument("--micro-batches", type=int, default=4)
    tp.add_argument("--persistence", type=int, default=None,
                    help="ZeRO-3 stage3_param_persistence_threshold (default: vlrl's, policy.persistence_for)")
    tp.add_argument("--profile")
    tp.add_argument("--lora-rank", type=int, default=0, help="model.lora.rank (alpha = 2 x rank); 0 = full fine-tune")
    for name in ("train-profile", "recipe"):
        s = sub.choices[name]
        s.add_argument("--compile", action="store_true", help="model.compile: torch.compile each block")
        s.add_argument("--no-checkpointing", action="store_true", help="model.gradient_checkpointing false")
    r = sub.choices["recipe"]
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--micro-batch", type=int, default=8)
    r.add_argument("--zero-stage", type=int, default=3)
    r.add_argument("--name", default="bench")
    r.add_argument("--run-dir", default="/tmp/bench-runs")
    r.add_argument("--lora-rank", type=int, default=0, help="model.lora.rank (alpha = 2 x rank); 0 = full fine-tune")
    r.add_argument("--offload", action="store_true")
    r.add_argument("--grad-accum-fp32", action="store_true", help="trainer.grad_accum_fp32 (ZeRO-1, bf16, no offload)")
    pk = sub.add_parser("pack", help="packed vs padded micro-batches at one token budget")
    pk.add_argument("--model", required=True)
    pk.add_argument("--data", required=True)
    pk.add_argument("--seqs", type=int, default=64)
    pk.add_argument("--group", type=int, default=1, help="consecutive sequences sharing one prompt image, as a "
                    "GRPO group's n samples do (the vision tower encodes it once per micro-batch); 1: all distinct")
    pk.add_argument("--no-share-images", action="store_true", help="encode every copy of a repeated image")
    pk.add_argument("--budget", type=int, default=16384)
    pk.add_argument("--min-tokens", type=int, default=16)
    pk.add_argument("--max-tokens", type=int, default=1024)
    pk.add_argument("--stage", type=int, default=2)
    pk.add_argument("--sdpa-mask", action="store_true", help="packed rows through sdpa with the block mask "
                    "(every block computed), not the varlen kernel")
    pk.add_argument("--profile", help="write the profiler table of one pass of each mode to PREFIX_padded.txt / PREFIX_packed.txt")
    pk.add_argument("--json")
    pk.add_argument("--compile", action="store_true", help="model.compile: torch.compile each block")
    f = sub.add_parser("fit", help="trainer-only peak, LoRA vs full, 7B LoRA, train-phase MFU")
    f.add_argument("--dir", required=True)
    f.add_argument("--device", required=True)
    f.add_argument("--commit", required=True)
    f.add_argument("--out", default="bench/results/gpu.json")
    m = sub.add_parser("summarize")
    m.add_argument("--dir", required=True)
    m.add_argument("--out", default="bench/results/gpu.json")
    m.add_argument("--device", help="the machine, in words (default: the first result file's)")
    m.add_argument("--previous", default="bench/results/gpu.json", help="keep parts this session did not re-measure")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"build": cmd_build, "data": cmd_data, "rollout": cmd_rollout, "sync": cmd_sync, "recipe": cmd_recipe, "pack": cmd_pack,
     "train-profile": cmd_train_profile, "summarize": cmd_summarize, "fit": cmd_fit}[a.cmd](a)


if __name__ == "__main__":
    main()
