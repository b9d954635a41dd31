"""GRPO on images through the Tinker API: the colours task (name the colour of the shape), from a
format-only start, with the `importance_sampling` loss, sampling from the service.

Any Tinker-compatible server works; `vlrl serve` is the one this was written against. The cookbook has no
image RL recipe; this is vlrl's. Client side only: the tinker SDK, the model's tokenizer and image processor
(to count an image's positions, as the cookbook does), pyarrow to read the data.

    vlrl tiny-model tiny --family qwen2_5_vl
    vlrl prepare colors --out colors --rows 1200 --num-colors 4 --image-size 84
    vlrl serve tiny --api-key tml-local &
    TINKER_API_KEY=tml-local python examples/tinker_colors_rl.py --model tiny --data colors

Stage 1 (format only): cross-entropy on a random colour per image, so the model answers with a colour word
but no better than chance. Stage 2 (GRPO) trains a new client loaded from those weights (a fresh optimizer);
stage 1's client keeps them, as the reference of a KL penalty. Per step, the current weights become a sampler,
every prompt is sampled `--group` times, the reward is 1 for naming the right colour, and each sampled token's
advantage is its sample's group-normalised reward minus `--kl-coef` times (its log-prob under the policy minus
under the reference, from a forward pass of stage 1's client), divided by the step's sampled tokens (a token
mean); one `importance_sampling` forward_backward plus an optim_step train on them. Without the KL term the
policy's entropy collapsed and some seeds stalled at 3 of 4 colours (as in vlrl's CPU demo). Held-out accuracy
(greedy) is printed before and after, and written to --out; with `--stop-at ACC` it is also checked every
`--eval-every` steps, and RL ends at the first check that reaches ACC (as `trainer.stop_at_val_accuracy` does).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import re
import time

import numpy as np


def load_rows(path: str) -> list[dict]:
    """(image bytes, question, truth, options) per record of a `vlrl prepare colors` parquet."""
    import pyarrow.parquet as pq

    rows = []
    for r in pq.read_table(path).to_pylist():
        parts = r["prompt"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        text = next(p["text"] for p in parts if p["type"] == "text")
        rows.append({"image": base64.b64decode(url.split(",", 1)[1]), "format": url[len("data:image/"):url.index(";")],
                     "question": text, "truth": r["reward_spec"]["ground_truth"], "options": r["extra_info"]["colors"]})
    return rows


class Prompts:
    """Records -> Tinker model inputs: Qwen's chat layout with one image chunk."""

    def __init__(self, tokenizer, image_processor):
        self.tok, self.ip = tokenizer, image_processor

    def image_tokens(self, data: bytes) -> int:
        from PIL import Image

        w, h = Image.open(io.BytesIO(data)).size
        return self.ip.get_number_of_image_patches(h, w, {}) // self.ip.merge_size ** 2

    def build(self, row: dict):
        from tinker import types

        enc = lambda s: self.tok.encode(s, add_special_tokens=False)  # noqa: E731
        return types.ModelInput(chunks=[
            types.EncodedTextChunk(tokens=enc("<|im_start|>user\n<|vision_start|>")),
            types.ImageChunk(data=row["image"], format=row["format"], expected_tokens=self.image_tokens(row["image"])),
            types.EncodedTextChunk(tokens=enc(f"<|vision_end|>{row['question']}<|im_end|>\n<|im_start|>assistant\n"))])


def reward(text: str, row: dict) -> float:
    """1 when the answer names exactly one of the colours and it is the right one (vlrl's colours env)."""
    named = [w for w in re.findall(r"[a-z]+", text[:200].lower()) if w in row["options"]]
    return float(len(named) == 1 and named[0] == row["truth"])


def datum(prompt, target: list[int], logprobs: list[float], advantages: list[float] | None,
          weight: float | None = None):
    """Tinker's layout: input = prompt + target[:-1]; position i predicts the next token. With `weight`, a
    cross-entropy datum (that weight on each target token), else an importance_sampling one (an advantage
    per target token)."""
    from tinker import types

    n_prompt = prompt.length
    model_input = prompt.append(types.EncodedTextChunk(tokens=target[:-1])) if len(target) > 1 else prompt
    targets = [0] * (n_prompt - 1) + target
    if weight is not None:
        return types.Datum(model_input=model_input, loss_fn_inputs={
            "target_tokens": np.array(targets, dtype=np.int64),
            "weights": np.array([0.0] * (n_prompt - 1) + [weight] * len(target), dtype=np.float32)})
    return types.Datum(model_input=model_input, loss_fn_inputs={
        "target_tokens": np.array(targets, dtype=np.int64),
        "logprobs": np.array([0.0] * (n_prompt - 1) + logprobs, dtype=np.float32),
        "advantages": np.array([0.0] * (n_prompt - 1) + list(advantages), dtype=np.float32)})


def evaluate(sampler, prompts: Prompts, rows: list[dict], max_tokens: int) -> float:
    from tinker import types

    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    futures = [sampler.sample(prompts.build(r), num_samples=1, sampling_params=params) for r in rows]
    tok = prompts.tok
    return float(np.mean([reward(tok.decode(f.result().sequences[0].tokens), r) for f, r in zip(futures, rows)]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="base_model as the server knows it (and where its processor is)")
    ap.add_argument("--data", required=True, help="a `vlrl prepare colors` folder (train.parquet, val.parquet)")
    ap.add_argument("--rank", type=int, default=0, help="LoRA rank; 0 = full fine-tune (vlrl serve)")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10, help="RL steps of linear lr warm-up")
    ap.add_argument("--kl-coef", type=float, default=0.1, help="KL penalty to the format-SFT weights (0: none)")
    ap.add_argument("--stop-at", type=float, default=None, help="end RL at the first held-out check this accurate")
    ap.add_argument("--eval-every", type=int, default=10, help="RL steps between held-out checks (with --stop-at)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--val", type=int, default=60, help="held-out records for accuracy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = ap.parse_args(argv)

    import tinker
    from tinker import types
    from transformers import AutoImageProcessor

    rng = random.Random(args.seed)
    train, val = load_rows(f"{args.data}/train.parquet"), load_rows(f"{args.data}/val.parquet")[:args.val]
    service = tinker.ServiceClient(base_url=args.base_url)
    tc = service.create_lora_training_client(base_model=args.model, rank=args.rank, seed=args.seed).result()
    tok = tc.get_tokenizer()
    prompts = Prompts(tok, AutoImageProcessor.from_pretrained(args.model))
    adam = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
    out: dict = {"start": time.time()}

    # stage 1: the answer format only (a random colour per image)
    for step in range(args.sft_steps):
        batch = rng.sample(train, args.prompts)
        answers = [tok.encode(rng.choice(r["options"]), add_special_tokens=False) + [tok.eos_token_id] for r in batch]
        n = sum(len(a) for a in answers)  # weights 1/n: a token mean, as vlrl's SFT trains (Tinker's is a sum)
        data = [datum(prompts.build(r), a, [], None, weight=1.0 / n) for r, a in zip(batch, answers)]
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=args.sft_lr, **adam)).result()
    out["accuracy_after_format_sft"] = evaluate(tc.save_weights_and_get_sampling_client().result(), prompts, val,
                                                args.max_tokens)
    print(f"after format-only SFT: held-out accuracy {out['accuracy_after_format_sft']:.3f}", flush=True)
    # stage 2 trains a new client loaded from these weights, with a fresh Adam, as `vlrl train` starts GRPO from
    # the SFT checkpoint (going on with the SFT's Adam moments, the reward rose about 20 steps later here).
    # Stage 1's client keeps the SFT weights, never stepped again: the KL penalty's reference.
    reference = tc
    tc = service.create_training_client_from_state(reference.save_state("format-sft").result().path).result()

    # stage 2: GRPO with importance_sampling, sampling from the service
    history, accuracy = [], None
    for step in range(args.steps):
        t0 = time.time()
        sampler = tc.save_weights_and_get_sampling_client().result()
        batch = rng.sample(train, args.prompts)
        built = [prompts.build(r) for r in batch]
        futures = [sampler.sample(p, num_samples=args.group, sampling_params=types.SamplingParams(
            max_tokens=args.max_tokens, temperature=1.0, seed=(args.seed * 1_000 + step) * 1_000 + i))  # one seed per prompt
            for i, p in enumerate(built)]
        groups = []
        for p, r, f in zip(built, batch, futures):
            seqs = f.result().sequences
            groups.append((p, seqs, np.array([reward(tok.decode(s.tokens), r) for s in seqs])))
        tokens = sum(len(s.tokens) for _, seqs, _ in groups for s in seqs)
        # (prompt, sample, advantage): the group-normalised reward; a group that agrees has none, and is kept
        # only for the KL term
        samples = [(p, s, a) for p, seqs, rewards in groups if rewards.std() > 0 or args.kl_coef
                   for s, a in zip(seqs, (rewards - rewards.mean()) / (rewards.std() + 1e-6))]
        kl = [np.zeros(len(s.tokens)) for _, s, _ in samples]
        if args.kl_coef and samples:
            # log p_policy - log p_reference of each sampled token, the reference's log-probs from one forward
            # pass of stage 1's client (a sampler of the SFT weights gives the same numbers through
            # compute_logprobs, but one request per sequence: here that made a step about twice as long)
            ref = reference.forward([datum(p, s.tokens, s.logprobs, [0.0] * len(s.tokens)) for p, s, _ in samples],
                                    "importance_sampling").result().loss_fn_outputs
            kl = [np.array(s.logprobs) - o["logprobs"].to_numpy()[-len(s.tokens):]
                  for (_, s, _), o in zip(samples, ref)]
        # per token: the sample's advantage minus kl_coef * (log p_policy - log p_reference), the KL penalty folded
        # into the advantages as tinker-cookbook does (it also centres the penalty on its batch mean; not here),
        # divided by the step's sampled tokens (a token mean)
        data = [datum(p, s.tokens, s.logprobs, list((a - args.kl_coef * k) / tokens))
                for (p, s, a), k in zip(samples, kl)]
        if data:
            fb = tc.forward_backward(data, "importance_sampling")
            lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
            tc.optim_step(types.AdamParams(learning_rate=lr, **adam)).result()
            fb.result()
        row = {"step": step + 1, "reward": float(np.mean([g[2].mean() for g in groups])), "datums": len(data),
               "kl": round(float(np.mean(np.concatenate(kl))) if kl else 0.0, 4),  # per sampled token
               # mean -log p of the sampled tokens: an estimate of the policy's entropy per token
               "entropy": round(-float(np.mean([lp for _, seqs, _ in groups for s in seqs for lp in s.logprobs])), 4),
               "seconds": round(time.time() - t0, 2)}
        accuracy = None
        if args.stop_at is not None and (step + 1) % args.eval_every == 0:
            accuracy = row["accuracy"] = evaluate(tc.save_weights_and_get_sampling_client().result(), prompts, val,
                                                  args.max_tokens)
        history.append(row)
        if (step + 1) % 10 == 0 or accuracy is not None:
            print(json.dumps(row), flush=True)
        if accuracy is not None and accuracy >= args.stop_at:
            break  # reached: the weights just checked are the result
    if accuracy is None:
        accuracy = evaluate(tc.save_weights_and_get_sampling_client().result(), prompts, val, args.max_tokens)
    out["accuracy_after_rl"] = accuracy
    out["history"] = history
    out["seconds"] = round(time.time() - out.pop("start"), 1)
    print(f"after GRPO: held-out accuracy {out['accuracy_after_rl']:.3f} ({out['seconds']} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
