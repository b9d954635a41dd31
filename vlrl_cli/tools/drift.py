"""`vlrl check-drift`: do the rollout engine and the trainer agree on tokens, pixels and log-probs?

1. Generate with the inference engine through the training rollout path (rollout.collect), keeping each
   sampled token's engine log-prob.
2. Score the same token ids with the same image tensors through the trainer's forward
   (batches.sequence_logprobs; optionally inside DeepSpeed at a ZeRO stage).
3. Statistics of the per-token differences, overall and split by prompt kind, turn and token position.
4. Agreement checks that name the cause: engine prompt ids, the pixels the engine's vision encoder
   received (captured by a hook, hashed per image), image-token counts, sampling settings.
5. `after_update`: push a known weight change through the training sync path and re-check previously
   seen and unseen images (a stale vision-encoder cache shows up as drift on seen images only).

Sign convention: delta = trainer log-prob - engine log-prob; ratio r = exp(delta) = p_train / p_engine is
the importance weight a trainer would apply to the engine's samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..rollout.engines import Sampling
from ..errors import UserError
from ..model.render import image_token_counts, per_image

AFTER_IMAGE_TOKENS = 4  # "first tokens after an image": this many generated tokens after context holding an image


@dataclass
class DriftOptions:
    engine: str = "hf"
    train_dtype: str = "float32"
    engine_dtype: str | None = None  # default: the trainer's dtype
    zero_stage: int | None = None  # None: the plain transformers forward; 0-3: wrapped by DeepSpeed
    lora_rank: int = 0  # > 0: the trainer is a LoRA policy (adapters on the language model; lora.py)
    # the trainer's blocks compiled: "auto" as `vlrl train` decides (model.compile: on a GPU with ZeRO 0-2 or
    # the plain forward), so by default the check scores with the forward training would run
    compile: bool | str = "auto"
    samples: int = 16  # records (one rollout each); after_update also uses the next `samples` as unseen
    sampling: Sampling = field(default_factory=lambda: Sampling(1.0, 1.0, 64, 0))  # its seed seeds the whole check
    max_turns: int | None = None  # None: as many as the environment allows
    max_context_tokens: int = 8192
    after_update: bool = False
    update_from: str | None = None  # a checkpoint (HF dir) to load as the update, instead of a perturbation
    perturb: float = 0.1  # relative noise: each tensor += perturb * rms(tensor) * N(0, 1)
    max_mean: float | None = None
    max_abs: float | None = None
    gpu_memory_utilization: float = 0.3
    micro_batch: int = 8
    pack_tokens: int = 0  # > 0: the trainer scores packed rows of at most this many tokens (trainer.pack_tokens)
    envs: dict = field(default_factory=dict)  # extra env_class -> "module:Class" (as a recipe's envs:)
    max_images: int | None = None  # the image history's bound (rollout.history.max_images)


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not applicable here (detail says why)
    detail: str
    severity: str = "error"  # error: fails the run (exit 1); warning: reported only
    fix: str = ""


@dataclass
class TokenRows:
    """One row per generated token, flat arrays."""

    engine: np.ndarray
    trainer: np.ndarray
    seq: np.ndarray  # trajectory index
    turn: np.ndarray  # 1-based
    pos: np.ndarray  # position within its turn's response
    with_images: np.ndarray  # the prompt has images
    after_image: np.ndarray  # among the first AFTER_IMAGE_TOKENS after context holding an image
    where: list = field(default_factory=list)  # (trajectory index, index in token_ids) per row

    def select(self, m: np.ndarray) -> "TokenRows":
        return TokenRows(self.engine[m], self.trainer[m], self.seq[m], self.turn[m], self.pos[m], self.with_images[m],
                         self.after_image[m], [w for w, k in zip(self.where, m) if k])


# --- statistics -------------------------------------------------------------------------------------


def drift_stats(engine_lp: np.ndarray, trainer_lp: np.ndarray, seq: np.ndarray) -> dict:
    """Every number of the report for one set of tokens (see the module docstring for signs)."""
    n = int(len(engine_lp))
    if n == 0:
        return {"tokens": 0, "sequences": 0}
    d = trainer_lp.astype(np.float64) - engine_lp.astype(np.float64)
    a = np.abs(d)
    r = np.exp(np.clip(d, -50, 50))
    seqs = np.unique(seq)
    seq_logr = np.array([d[seq == s].sum() for s in seqs])
    r_seq = np.exp(np.clip(seq_logr, -50, 50))
    p_tr, p_en = np.exp(trainer_lp.astype(np.float64)), np.exp(engine_lp.astype(np.float64))
    dp = np.abs(p_tr - p_en)
    corr = None
    if n > 1 and p_tr.std() > 0 and p_en.std() > 0:
        corr = float(np.corrcoef(p_tr, p_en)[0, 1])
    return {
        "tokens": n,
        "sequences": int(len(seqs)),
        "abs_diff": {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                     "p99": float(np.percentile(a, 99)), "max": float(a.max())},
        "signed_mean": float(d.mean()),
        "k3_kl": float((r - 1 - d).mean()),  # KL(engine || trainer), estimated on the engine's samples
        "chi2_token": float(((r - 1) ** 2).mean()),
        "chi2_sequence": float(((r_seq - 1) ** 2).mean()),
        "is_ratio": {"mean": float(r.mean()), "min": float(r.min()), "max": float(r.max()),
                     "ess_token": float(r.sum() ** 2 / (n * (r ** 2).sum())),
                     "ess_sequence": float(r_seq.sum() ** 2 / (len(r_seq) * (r_seq ** 2).sum()))},
        "prob_abs_diff": {"mean": float(dp.mean()), "max": float(dp.max()), "std": float(dp.std())},
        "prob_pearson": corr,
    }


def split_stats(rows: TokenRows) -> dict:
    out = {"overall": drift_stats(rows.engine, rows.trainer, rows.seq)}
    out["by_prompt_kind"] = {name: drift_stats(sub.engine, sub.trainer, sub.seq) for name, m in
                             (("with_images", rows.with_images), ("text_only", ~rows.with_images))
                             if (sub := rows.select(m)).engine.size}
    out["by_turn"] = {f"turn_{t}": drift_stats(sub.engine, sub.trainer, sub.seq)
                      for t in sorted(set(rows.turn.tolist())) if (sub := rows.select(rows.turn == t)).engine.size}
    out["by_position"] = {name: drift_stats(sub.engine, sub.trainer, sub.seq) for name, m in
                          (("after_image", rows.after_image), ("rest", ~rows.after_image))
                          if (sub := rows.select(m)).engine.size}
    return out


# --- the two sides ----------------------------------------------------------------------------------


class RecordingEngine:
    """Wraps an engine: remembers, per request, the prompt ids the trainer sent and those the engine used."""

    def __init__(self, engine):
        self.engine = engine
        self.prompts: list[tuple[list[int], list[int]]] = []  # (trainer ids, engine ids)

    def generate(self, requests, sampling):
        out = self.engine.generate(requests, sampling)
        for req, used in zip(requests, self.engine.last_prompt_ids):
            self.prompts.append((list(req.input_ids), list(used)))
        return out


def load_trainer(model_path: str, dtype: str, zero_stage: int | None, lora_rank: int = 0, compile_blocks: bool = False,
                 packed: bool = False):
    """The training forward: a transformers model, or the same inside a DeepSpeed engine (ZeRO-S); with
    lora_rank > 0 a LoRA policy (its adapters start as PEFT initialises them: B = 0, the base model's output);
    compile_blocks: each block compiled (model.loading.compile_layers), the forward `vlrl train` runs on a GPU;
    packed: the attention trainer.pack_tokens trains with (model.attention.packed_text_attention)."""
    from ..train.recipe import LoraCfg
    from ..train.distributed import device, init_distributed

    lora = LoraCfg(rank=lora_rank) if lora_rank > 0 else None
    if zero_stage is None:
        from ..train.policy import prepare_model

        return prepare_model(model_path, dtype, packed=packed, compile_blocks=compile_blocks, lora=lora).to(device()).eval()
    from ..train.policy import build_policy

    init_distributed()
    policy = build_policy(model_path, lr=0.0, weight_decay=0.0, warmup=0, stage=zero_stage, offload=False,
                          grad_clip=1.0, dtype=dtype, persistence_threshold=0, lora=lora, compile_blocks=compile_blocks,
                          packed=packed)
    policy.eval()
    return policy


def _params(trainer):
    return list(getattr(trainer, "module", trainer).named_parameters())


def apply_update(trainer, perturb: float, update_from: str | None, seed: int) -> str:
    """Change the trainer's weights in a known way: a checkpoint's weights, or seeded relative noise.

    A LoRA trainer changes its adapters only (the base stays); LoRA's B starts at zero, so a zero tensor
    gets noise of scale 0.05 instead of its (zero) rms."""
    import deepspeed

    from ..train.lora import is_lora

    lora = is_lora(getattr(trainer, "module", trainer))
    if lora and update_from:
        raise UserError("--update-from loads a full checkpoint; with --lora-rank the update is a change of the adapters")

    source = None
    if update_from:
        from ..model.loading import load_vlm

        source = dict(load_vlm(update_from, torch.float32).named_parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in _params(trainer):
        if lora and ".lora_" not in name:
            continue
        ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with ctx, torch.no_grad():
            if source is not None:
                if name not in source:
                    raise UserError(f"--update-from {update_from}: no parameter {name}")
                p.copy_(source[name].to(p.device, p.dtype))
            else:
                noise = torch.randn(p.shape, generator=gen).to(p.device, torch.float32)
                rms = p.float().pow(2).mean().sqrt()
                scale = rms if rms > 0 else torch.tensor(0.05)
                p.add_((noise * perturb * scale).to(p.dtype))
    what = "adapter" if lora else "tensor"
    return f"weights of {update_from}" if update_from else f"relative noise {perturb} x rms per {what} (seed {seed + 1})"


def score(trainer, trajs, processor, temperature: float, banned: list[int], micro_batch: int,
          pack_tokens: int = 0) -> list[np.ndarray]:
    """Trainer log-probs [len(token_ids)] per trajectory, through the training code path (packed rows with
    pack_tokens > 0, as trainer.pack_tokens trains; greedy rollouts are scored at temperature 1)."""
    from ..train.batches import score_sequences
    from ..train.distributed import device

    seqs = [seq for t in trajs for seq in t.sequences()]  # every segment of a cut image history, in order
    return score_sequences(trainer, seqs, processor, 1.0 if temperature == 0 else temperature, banned, device(),
                           per_batch=micro_batch, pack_tokens=pack_tokens)


def token_rows(trajs, trainer_lps: list[np.ndarray], image_token_id: int) -> TokenRows:
    """One row per generated token. trainer_lps: one array per sequence of every trajectory, in order (`score`);
    a trajectory's turns are counted across the segments of a cut image history."""
    cols = {k: [] for k in ("engine", "trainer", "seq", "turn", "pos", "with_images", "after_image")}
    where = []
    lps = iter(trainer_lps)
    for s, t in enumerate(trajs):
        has_images = image_token_id in t.sequences()[0].token_ids[:t.prompt_len]
        turn, pos, saw_image, after, in_response = 0, 0, False, False, False
        for g, seq in enumerate(t.sequences()):
            tlp = next(lps)
            for k, (tok, m) in enumerate(zip(seq.token_ids, seq.loss_mask)):
                if not m:
                    saw_image = saw_image or tok == image_token_id
                    in_response = False
                    continue
                if not in_response:  # a new turn starts
                    turn, pos, after, saw_image, in_response = turn + 1, 0, saw_image, False, True
                for key, v in (("engine", seq.engine_logp[k]), ("trainer", float(tlp[k])), ("seq", s), ("turn", turn),
                               ("pos", pos), ("with_images", has_images), ("after_image", after and pos < AFTER_IMAGE_TOKENS)):
                    cols[key].append(v)
                where.append((s, g, k))
                pos += 1
    return TokenRows(np.array(cols["engine"], dtype=np.float64), np.array(cols["trainer"], dtype=np.float64),
                     np.array(cols["seq"], dtype=np.int64), np.array(cols["turn"], dtype=np.int64),
                     np.array(cols["pos"], dtype=np.int64), np.array(cols["with_images"], dtype=bool),
                     np.array(cols["after_image"], dtype=bool), where)


def worst_tokens(rows: TokenRows, trajs, tokenizer, k: int = 10, context: int = 24) -> list[dict]:
    d = np.abs(rows.trainer - rows.engine)
    out = []
    for i in np.argsort(-d)[:k]:
        s, g, pos = rows.where[i]
        t = trajs[s]
        seq = t.sequences()[g]
        start = t.prompt_len if g == 0 else 0
        out.append({"record_id": t.record_id, "turn": int(rows.turn[i]), "position": int(rows.pos[i]),
                    "token": tokenizer.decode([seq.token_ids[pos]]), "token_id": int(seq.token_ids[pos]),
                    "context": tokenizer.decode(seq.token_ids[max(start, pos - context):pos]),
                    "engine_logprob": float(rows.engine[i]), "trainer_logprob": float(rows.trainer[i]),
                    "abs_diff": float(d[i])})
    return out


# --- agreement checks -------------------------------------------------------------------------------


def trainer_images(trajs) -> list[tuple[str, int, tuple, torch.Tensor]]:
    """(record id, image index, grid, pixel rows) for every image the trainer scores, in order."""
    return [(t.record_id, j, g, rows) for t in trajs for seq in t.sequences()
            for j, (g, rows) in enumerate(per_image(seq.tensors))]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def check_image_tensors(trajs, captured: list[tuple[tuple, torch.Tensor]]) -> Check:
    mine = trainer_images(trajs)
    if not mine:
        return Check("image_tensors", None, "no images in these prompts")
    if not captured:
        return Check("image_tensors", False, "the engine's vision encoder received nothing (probe not attached?)")
    dtype = captured[0][1].dtype  # compare at the precision the engine ran its encoder in
    engine_hashes = {_digest(px) for _, px in captured}
    missing = [(rid, j, g, px) for rid, j, g, px in mine if _digest(px.to(torch.float32).to(dtype)) not in engine_hashes]
    if not missing:
        return Check("image_tensors", True, f"{len(mine)}/{len(mine)} trainer images bit-identical to what the "
                                            f"engine's vision encoder received (compared in {str(dtype).replace('torch.', '')})")
    rid, j, g, px = missing[0]
    k = mine.index(missing[0])
    why = ""
    if k < len(captured):  # the engine sees images in prompt order: name the first difference concretely
        eg, epx = captured[k]
        if eg != g:
            why = f"; record {rid!r} image {j}: trainer grid (t,h,w)={g}, engine grid {eg} (a different resize)"
        else:
            diff = (px.to(torch.float32) - epx.to(torch.float32)).abs().max().item()
            why = f"; record {rid!r} image {j}: same grid {g}, max |pixel difference| {diff:.4g} (different normalisation or resampling)"
    return Check("image_tensors", False, f"{len(missing)}/{len(mine)} trainer images differ from the engine's{why}",
                 fix="run one image preprocessing for both sides (same processor config: min/max pixels, resample, "
                     "mean/std); vlrl canonicalises images at prepare time so both sides start from the same pixels")


def check_prompt_ids(prompts: list[tuple[list[int], list[int]]]) -> Check:
    bad = [(i, a, b) for i, (a, b) in enumerate(prompts) if a != b]
    if not bad:
        return Check("prompt_ids", True, f"{len(prompts)}/{len(prompts)} engine prompts equal the processor's ids")
    i, a, b = bad[0]
    first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return Check("prompt_ids", False, f"{len(bad)}/{len(prompts)} engine prompts differ from the processor's ids; first: "
                                      f"request {i}, trainer {len(a)} ids vs engine {len(b)}, first difference at index {first}",
                 fix="same chat template and tokenizer on both sides; image placeholders must expand to the same counts")


def check_image_token_counts(trajs, prompts, processor) -> Check:
    """Every sequence the trainer scores (each segment of a cut history) against the placeholder counts its
    image grids imply, and every engine request (one a turn) against the trainer's: a multi-turn episode adds
    images every turn and a bounded history drops old ones, so the first prompt alone proves little."""
    pad = processor.image_token_id
    problems, scored = [], 0
    for t in trajs:
        for segment, seq in enumerate(t.sequences(), 1):
            counts = image_token_counts(processor, seq.tensors)
            if not counts:
                continue
            scored += 1
            if (got := seq.token_ids.count(pad)) != sum(counts):
                problems.append(f"record {t.record_id!r} sequence {segment}: grids imply {sum(counts)}, trainer has {got}")
    for i, (mine, engine) in enumerate(prompts):
        if mine.count(pad) != engine.count(pad):
            problems.append(f"request {i}: trainer has {mine.count(pad)} placeholders, engine {engine.count(pad)}")
    if not scored:
        return Check("image_token_counts", None, "no images in these prompts")
    if not problems:
        return Check("image_token_counts", True, f"{scored}/{scored} scored sequences with images and {len(prompts)} engine requests: "
                                                 "placeholder counts match the image grids on both sides")
    return Check("image_token_counts", False, f"{len(problems)} mismatches over {scored} sequences and {len(prompts)} "
                                              "requests: " + "; ".join(problems[:3]),
                 fix="the processor's merge size / patch size must match the model's")


def check_packed_rows(trajs, pack_tokens: int) -> Check:
    """A packed drift check proves something only where a row held two sequences or more: a budget shorter than
    the sequences sends each alone, and the gate would pass on the padded path it was asked to replace."""
    from ..train.batches import micro_batches

    lengths = [len(seq.token_ids) for t in trajs for seq in t.sequences()]
    rows = micro_batches(lengths, 0, pack_tokens)
    shared = sum(len(r) > 1 for r in rows)
    if shared:
        return Check("packed_rows", True, f"{len(lengths)} sequences scored in {len(rows)} packed rows of at most "
                                          f"{pack_tokens} tokens, {shared} of them holding two or more")
    return Check("packed_rows", False, f"--pack-tokens {pack_tokens} put every sequence in a row of its own "
                                       f"(sequences of {min(lengths)}-{max(lengths)} tokens): packing was not tested",
                 fix=f"--pack-tokens of at least {2 * max(lengths)} (or more --samples)")


def sampling_checks(s: Sampling) -> list[Check]:
    checks = []
    if s.temperature == 0:
        checks.append(Check("sampling_temperature", False, "greedy decoding (temperature 0): log-probs are those of the "
                            "T=1 softmax while the sampler took the argmax; RL's importance ratios assume sampling",
                            "warning", "use temperature > 0 (1.0 for GRPO) in rollouts"))
    else:
        checks.append(Check("sampling_temperature", True, f"both sides use softmax(logits / {s.temperature}) "
                            "(vLLM: processed_logprobs; trainer: logits divided by the rollout temperature)"))
    trunc = [f"top_p={s.top_p}"] * (s.top_p < 1) + [f"top_k={s.top_k}"] * (s.top_k > 0)
    if trunc:
        checks.append(Check("sampling_truncation", False, f"{', '.join(trunc)}: the engine samples from a truncated, "
                            "renormalised distribution while the trainer scores the full softmax, so their log-probs differ "
                            "by construction (and vLLM's processed log-probs are the truncated ones)", "warning",
                            "train with top_p=1.0 and top_k off; keep truncation for evaluation only"))
    else:
        checks.append(Check("sampling_truncation", True, "no top-p / top-k truncation"))
    return checks


def threshold_checks(phases: dict[str, dict], o: DriftOptions) -> list[Check]:
    checks = []
    for key, limit, flag in (("mean", o.max_mean, "--max-mean"), ("max", o.max_abs, "--max-abs")):
        if limit is None:
            continue
        values = {name: s["overall"]["abs_diff"][key] for name, s in phases.items() if s["overall"].get("tokens")}
        worst = max(values, key=values.get)
        ok = all(v <= limit for v in values.values())
        checks.append(Check(f"max_{'mean' if key == 'mean' else 'abs'}", ok,
                            f"|delta logprob| {key} {values[worst]:.4g} ({worst}) {'<=' if ok else '>'} {flag} {limit}"))
    return checks


# --- the whole diagnosis ----------------------------------------------------------------------------


def _rollouts(engine, records, processor, o: DriftOptions, seed: int):
    import dataclasses

    from ..rollout.episodes import collect

    rec = RecordingEngine(engine)
    trajs = collect(rec, records, processor, 1, dataclasses.replace(o.sampling, seed=seed), o.max_turns, o.max_context_tokens,
                    o.envs, max_images=o.max_images)
    usable = [t for t in trajs if t.response_len > 0]
    failed = [t for t in trajs if t.done_reason == "env_error"]
    if not usable and failed:  # nothing to compare because the environment failed: say that, not "no tokens"
        raise UserError(f"every episode failed in its environment ({len(failed)} of {len(trajs)}); the first: "
                        f"{failed[0].info['env_error']}")
    return usable, rec.prompts


def check_drift(model: str, data: str, o: DriftOptions = DriftOptions(), engine_processor=None, engine=None,
                progress: Callable[[str], None] | None = None) -> dict:
    """The whole diagnosis; returns the report (also what --json writes). report["passed"] drives the exit code.

    engine_processor: the engine side's processor (default: loaded from `model`, as an engine would).
    engine: a ready engine instead of `o.engine` (tests inject faulty ones).
    """
    from ..rollout.engines import VisionInputProbe, make_engine, placeholder_token_ids
    from ..data.records import load_records
    from ..model.loading import load_processor
    from ..train.runs import resolve_model
    from ..train.weight_sync import sync_weights

    say = progress or (lambda msg: None)
    if o.compile is True and o.zero_stage == 3:
        raise UserError("--compile needs --zero-stage 0-2 or none (ZeRO-3's module hooks and compiled blocks do not mix)")
    from ..train.policy import compile_wanted

    compiled = compile_wanted(o.compile, o.zero_stage or 0)
    model = resolve_model(model)
    records = load_records(data, o.samples * (2 if o.after_update else 1))
    seen, unseen = records[:o.samples], records[o.samples:]
    processor = load_processor(model)
    banned = placeholder_token_ids(processor)
    engine_dtype = o.engine_dtype or o.train_dtype
    if o.zero_stage is not None:  # as in training: the process group first, so a vLLM engine joins it
        from ..train.distributed import init_distributed

        init_distributed()
    say(f"loading the {o.engine} engine ({engine_dtype})")
    if engine is None:
        from ..rollout.episodes import engine_limits

        engine = make_engine(o.engine, model, engine_processor or load_processor(model), dtype=engine_dtype,
                             seed=o.sampling.seed, own_preprocessing=True, gpu_memory_utilization=o.gpu_memory_utilization,
                             limits=engine_limits(records, o.max_context_tokens, o.max_turns, o.envs, o.max_images))
    if hasattr(engine, "strict_prompts"):
        engine.strict_prompts = False  # report a prompt mismatch instead of raising
    probe = VisionInputProbe()
    engine.attach_vision_probe(probe)
    say(f"loading the trainer ({o.train_dtype}{'' if o.zero_stage is None else f', DeepSpeed ZeRO-{o.zero_stage}'}"
        f"{', compiled blocks' if compiled else ''})")
    trainer = load_trainer(model, o.train_dtype, o.zero_stage, o.lora_rank, compiled, o.pack_tokens > 0)

    say(f"generating {len(seen)} rollouts")
    trajs, prompts = _rollouts(engine, seen, processor, o, o.sampling.seed)
    if not trajs:
        raise UserError(f"{data}: the engine generated no tokens for any of {len(seen)} records")
    say("scoring with the trainer")
    lps = score(trainer, trajs, processor, o.sampling.temperature, banned, o.micro_batch, o.pack_tokens)
    rows = token_rows(trajs, lps, processor.image_token_id)
    stats = split_stats(rows)
    phases = {"before_update": stats}
    checks = [check_prompt_ids(prompts), check_image_tensors(trajs, probe.images),
              check_image_token_counts(trajs, prompts, processor), *sampling_checks(o.sampling)]
    if o.pack_tokens > 0:
        checks.append(check_packed_rows(trajs, o.pack_tokens))
    report = {
        "settings": {"model": model, "data": data, **asdict(o), "engine_dtype": engine_dtype},
        "token_abs_diff": stats["overall"].get("abs_diff", {}),
        "stats": stats,
        "worst_tokens": worst_tokens(rows, trajs, processor.tokenizer),
        "deltas": {"delta": (rows.trainer - rows.engine).tolist(), "position": rows.pos.tolist()},
    }

    if o.after_update:
        update = apply_update(trainer, o.perturb, o.update_from, o.sampling.seed)
        say(f"update: {update}; syncing through the training path")
        engine.sleep()  # as in training: the update arrives while the engine sleeps
        sync_s = sync_weights(trainer, engine)
        engine.wake()
        # how much the update moved the trainer on the tokens scored before: a stale cache must be visible
        moved = score(trainer, trajs, processor, o.sampling.temperature, banned, o.micro_batch, o.pack_tokens)
        effect = float(np.mean(np.concatenate([np.abs(a - b)[np.array(seq.loss_mask, dtype=bool)]
                                               for a, b, seq in zip(moved, lps, [q for t in trajs for q in t.sequences()])])))
        after = {"update": update, "sync_seconds": sync_s, "update_effect_abs_mean": effect}
        for name, recs, seed in (("seen", seen, o.sampling.seed + 1), ("unseen", unseen, o.sampling.seed + 2)):
            if not recs:
                continue
            say(f"after the update: {len(recs)} {name} records")
            t2, p2 = _rollouts(engine, recs, processor, o, seed)
            r2 = token_rows(t2, score(trainer, t2, processor, o.sampling.temperature, banned, o.micro_batch, o.pack_tokens), processor.image_token_id)
            after[name] = split_stats(r2)
            phases[f"after_update_{name}"] = after[name]
            if name == "seen":
                after["worst_tokens_seen"] = worst_tokens(r2, t2, processor.tokenizer)
        report["after_update"] = after
        seen_mean = after["seen"]["overall"]["abs_diff"]["mean"]
        before_mean = stats["overall"]["abs_diff"]["mean"]
        ref = after["unseen"]["overall"]["abs_diff"]["mean"] if "unseen" in after else before_mean
        ok = seen_mean <= 2 * ref + 0.005
        checks.append(Check("after_update_seen_images", ok,
                            f"after the update, seen images drift {seen_mean:.4g} vs {ref:.4g} "
                            f"({'unseen images' if 'unseen' in after else 'before the update'})",
                            fix="" if ok else "a cache served results of the old weights: clear prefix, multimodal and "
                                              "vision-encoder caches after every weight load"))
        checks.append(Check("update_visible", effect > 5 * max(before_mean, 1e-6),
                            f"the update moved the trainer's log-probs by {effect:.4g} on average, "
                            f"{effect / max(before_mean, 1e-9):.0f}x the drift before it", "warning",
                            "a larger --perturb, so a stale cache could not hide"))
    checks += threshold_checks(phases, o)
    report["checks"] = [asdict(c) for c in checks]
    report["passed"] = all(c.passed is not False for c in checks if c.severity == "error")
    return report


def write_plot(report: dict, path: Path) -> None:
    """Histogram of |delta| and delta against token position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.array(report["deltas"]["delta"])
    pos = np.array(report["deltas"]["position"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    a = np.abs(d)
    floor = max(a[a > 0].min() if (a > 0).any() else 1e-8, 1e-8)
    ax1.hist(np.log10(np.maximum(a, floor)), bins=50, color="#4c72b0")
    ax1.set_xlabel("log10 |trainer - engine| log-prob")
    ax1.set_ylabel("tokens")
    ax1.set_title(f"{len(d)} tokens, mean |delta| {a.mean():.3g}, max {a.max():.3g}")
    ax2.scatter(pos, d, s=4, alpha=0.4, color="#4c72b0")
    if len(pos):
        means = [d[pos == p].mean() for p in range(pos.max() + 1)]
        ax2.plot(range(len(means)), means, color="#dd8452", label="mean")
        ax2.legend()
    ax2.axhline(0, color="black", lw=0.5)
    ax2.set_xlabel("token position in the response")
    ax2.set_ylabel("trainer - engine log-prob")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(x):
    """JSON-safe: NaN/inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x
