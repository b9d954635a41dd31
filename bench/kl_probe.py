"""Which forward disagrees: one GRPO batch of a recipe at its real shape, scored by every path vlrl has.

A step-1 KL (policy against its own frozen copy) or an engine/trainer drift far above the others' asks which
forward is the odd one. This builds the recipe's random real-size model and data (bench/recipe_shape.py),
generates one step's rollouts with the recipe's engine, and scores the same micro-batches with:

  z3_train_grad   the policy as `vlrl train` builds it (DeepSpeed, the recipe's ZeRO stage and recompute),
                  train mode, gradients on: the forward whose log-probs the loss, the KL and the drift use
  z3_eval_nograd  the same engine, eval mode, no gradients (what check-drift scores)
  reference       the KL reference (train.grpo.reference_model), no gradients
  plain_train     the bare transformers model with recompute, train mode, gradients on (no DeepSpeed)
  mb1             z3_train_grad one sequence per micro-batch (no padding, no neighbours)
  noshare         z3_train_grad with repeated images encoded once per copy (model.share_images off)
  fp32            the reference in float32: the yardstick

and writes per path the mean/max |difference| to the engine and to fp32 (trained tokens), the k3 KL against
the reference, and the same by position bucket and by row, so an error that grows with position, sits in some
rows only (images, padding) or belongs to one path shows itself.

    python3 bench/kl_probe.py recipes/geometry3k.yaml --prompts 4 --out $OUT/kl_probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--work", default="/tmp/shape")
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", default="", help="comma-separated paths not to run")
    a = ap.parse_args()

    import torch

    from recipe_shape import data_for, model_for
    from vlrl_cli.data.records import load_records
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.rollout.engines import make_engine, placeholder_token_ids
    from vlrl_cli.rollout.episodes import run_episodes, start_episodes
    from vlrl_cli.train import batches
    from vlrl_cli.train.distributed import device, init_distributed, seed_everything
    from vlrl_cli.train.grpo import reference_model
    from vlrl_cli.train.policy import build_policy, compile_wanted, prepare_model
    from vlrl_cli.train.recipe import engine_limits, load_recipe

    t0 = time.perf_counter()
    recipe = load_recipe(a.recipe, check_paths=False)
    work = Path(a.work)
    model, size = model_for(recipe, work)
    train, _ = data_for(recipe, work / Path(a.recipe).stem, 16)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=model))
    m, r, tr = recipe.model, recipe.rollout, recipe.trainer
    init_distributed()
    seed_everything(tr.seed)
    dev = device()
    processor = load_processor(model)
    banned = placeholder_token_ids(processor)
    records = load_records(train)[:a.prompts]
    engine = make_engine(r.engine, model, processor, dtype=m.dtype, gpu_memory_utilization=0.3, seed=tr.seed,
                         attention=m.attention, limits=engine_limits(recipe, records))
    groups = start_episodes(records, processor, r.n, r.max_context_tokens, recipe.envs, recipe.data.max_prompt_tokens,
                            r.history.max_images)
    trajs = run_episodes(engine, groups, r.sampling(tr.seed), r.max_turns, {})
    engine.sleep(discard_weights=True)
    seqs = [s for t in trajs for s in t.sequences() if sum(s.loss_mask) > 0]
    groups_mb = batches.micro_batches([len(s.token_ids) for s in seqs], tr.micro_batch, 0)
    mbs = [batches.make_batch([seqs[i] for i in g], processor, dev) for g in groups_mb]
    singles = [batches.make_batch([s], processor, dev) for s in seqs]
    print(f"{len(seqs)} sequences, lengths {sorted(len(s.token_ids) for s in seqs)}; setup {time.perf_counter() - t0:.0f} s",
          flush=True)

    # every path's log-probs as one list of [len] arrays per sequence (trained tokens), in `seqs` order
    def per_seq(model_, bs, grad: bool, train_mode: bool):
        model_.train(train_mode)
        out = []
        for b in bs:
            with torch.set_grad_enabled(grad):
                lp = batches.sequence_logprobs(model_, b, r.temperature, banned, only=b.loss_mask)
            lp = lp.detach().float().cpu()
            out += [(lp[j], b.loss_mask[j].cpu().bool(), b.engine_logp[j].float().cpu()) for j in range(lp.shape[0])]
            del lp
        return out

    def reorder(rows, order):  # micro-batch order -> seqs order
        flat = [i for g in order for i in g]
        out = [None] * len(flat)
        for k, i in enumerate(flat):
            out[i] = rows[k]
        return out

    results, skip = {}, set(filter(None, a.skip.split(",")))
    clock = time.perf_counter()

    def record(name, rows):
        nonlocal clock
        results[name] = rows
        print(f"{name}: {time.perf_counter() - clock:.0f} s", flush=True)
        clock = time.perf_counter()

    policy = build_policy(model, lr=tr.lr, weight_decay=0.0, warmup=0, stage=tr.zero_stage, offload=False, grad_clip=1.0,
                          dtype=m.dtype, gradient_checkpointing=m.gradient_checkpointing, attention=m.attention,
                          compile_blocks=compile_wanted(m.compile, tr.zero_stage), share_images=m.share_images)
    record("z3_train_grad", reorder(per_seq(policy, mbs, True, True), groups_mb))
    record("z3_eval_nograd", reorder(per_seq(policy, mbs, False, False), groups_mb))
    if "mb1" not in skip:
        record("mb1", per_seq(policy, singles, True, True))
    if "noshare" not in skip:
        from vlrl_cli.model.image_sharing import share_repeated_images

        share_repeated_images(policy.module, enabled=False)
        record("noshare", reorder(per_seq(policy, mbs, True, True), groups_mb))
    ref = reference_model(recipe, policy, dev)
    record("reference", reorder(per_seq(ref, mbs, False, False), groups_mb))
    del policy, ref
    gc.collect()
    torch.cuda.empty_cache()
    if "plain_train" not in skip:
        plain = prepare_model(model, m.dtype, m.attention, gradient_checkpointing=m.gradient_checkpointing,
                              share_images=m.share_images).to(dev)
        record("plain_train", reorder(per_seq(plain, mbs, True, True), groups_mb))
        del plain
        gc.collect()
        torch.cuda.empty_cache()
    fp32 = prepare_model(model, "float32", m.attention, share_images=m.share_images).to(dev)
    record("fp32", reorder(per_seq(fp32, mbs, False, False), groups_mb))

    report = {"recipe": a.recipe, "size": size, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "sequences": len(seqs), "lengths": [len(s.token_ids) for s in seqs],
              "trained_tokens": [int(sum(s.loss_mask)) for s in seqs], "paths": {}}
    buckets = (0, 256, 512, 1024, 1536, 10**9)
    ref_rows = results["reference"]
    for name, rows in results.items():
        stats = {}
        for against in ("engine", "fp32", "reference"):
            diffs, by_bucket, by_row, kls = [], {}, [], []
            for i, (lp, mask, eng) in enumerate(rows):
                other = eng if against == "engine" else results[against][i][0]
                d = (lp - other)[mask].abs()
                diffs.append(d)
                by_row.append(round(float(d.mean()), 4) if len(d) else None)
                pos = mask.nonzero().flatten()
                first = int(pos[0]) if len(pos) else 0
                for lo, hi in zip(buckets, buckets[1:]):
                    sel = (pos - first >= lo) & (pos - first < hi)
                    if sel.any():
                        by_bucket.setdefault(f"{lo}-{hi if hi < 10**9 else 'end'}", []).append(d[sel])
                if against == "reference":
                    delta = (ref_rows[i][0] - lp)[mask]
                    kls.append(torch.exp(delta) - delta - 1)
            d = torch.cat(diffs)
            stats[against] = {"mean": round(float(d.mean()), 5), "max": round(float(d.max()), 4),
                              "by_position": {k: round(float(torch.cat(v).mean()), 5) for k, v in by_bucket.items()},
                              "by_row": by_row}
            if against == "reference":
                stats["k3_kl_to_reference"] = round(float(torch.cat(kls).mean()), 6)
        report["paths"][name] = stats
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    for name, s in report["paths"].items():
        print(f"{name:15s} vs engine {s['engine']['mean']:.4f}/{s['engine']['max']:.3f}  vs fp32 {s['fp32']['mean']:.4f}/"
              f"{s['fp32']['max']:.3f}  kl to reference {s['k3_kl_to_reference']:.2e}", flush=True)


if __name__ == "__main__":
    main()
