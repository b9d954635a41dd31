"""The same GRPO step in TRL's GRPOTrainer, for the side-by-side in bench/gpu_perf.py (run on the device).

Same model dir, same 448-px image prompts, 32 prompts x 8 samples = 256 sequences of exactly 256 generated
tokens (EOS ignored) per optimizer step, micro-batches of 8, DeepSpeed ZeRO-3 in bf16 with gradient
checkpointing, vLLM colocated with sleep mode, temperature 1, no KL (beta 0). TRL's own defaults otherwise.

    torchrun --nproc-per-node 1 bench/trl_grpo.py --model /tmp/q3b --data /tmp/bench-data/train.parquet --json trl.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def colour_reward(completions, answer, **_):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(a in str(t).lower()) for t, a in zip(texts, answer)]


def banned_bias(model: str) -> dict[int, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    return {tok.convert_tokens_to_ids(n): -1e4 for n in names if tok.convert_tokens_to_ids(n) is not None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--json")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=0.35)
    p.add_argument("--cpu-smoke", action="store_true", help="no vLLM, no DeepSpeed, CPU: checks the plumbing only")
    a = p.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlrl_cli.data.records import load_records
    from vlrl_cli.data.images import image_from_uri

    rows = []
    for r in load_records(a.data, a.prompts * a.steps):
        parts = r["prompt"][0]["content"]
        url = next(x["image_url"]["url"] for x in parts if x["type"] == "image_url")
        text = next(x["text"] for x in parts if x["type"] == "text")
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                     "image": image_from_uri(url), "answer": r["reward_spec"]["ground_truth"]})
    dataset = Dataset.from_list(rows)

    def now():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(now())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(now())

    sequences = a.prompts * a.n
    ds_config = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "gradient_clipping": "auto",
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "zero_allow_untested_optimizer": True}
    config = GRPOConfig(
        output_dir="/tmp/trl-out", max_steps=a.steps, learning_rate=1e-6, lr_scheduler_type="constant",
        per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=sequences // a.micro_batch,
        num_generations=a.n, max_completion_length=a.tokens, temperature=1.0, top_p=1.0,
        # the same ban vlrl applies: a random model otherwise samples an image placeholder now and then
        # (~0.4 per step of 256 x 256 tokens), and TRL's forward then fails on image tokens != features
        generation_kwargs={"ignore_eos": True, "logit_bias": banned_bias(a.model)}, beta=0.0,
        use_vllm=not a.cpu_smoke, vllm_mode="colocate", vllm_gpu_memory_utilization=a.gpu_mem,
        vllm_enable_sleep_mode=True, bf16=not a.cpu_smoke, gradient_checkpointing=True,
        deepspeed=None if a.cpu_smoke else ds_config, use_cpu=a.cpu_smoke, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, shuffle_dataset=False, dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=a.model, reward_funcs=colour_reward, args=config, train_dataset=dataset,
                          callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = [b - a_ for a_, b in zip(timer.marks, timer.marks[1:])]
    steady = steps[1:] or steps
    logs = [x for x in trainer.state.log_history if "completions/mean_length" in x or "loss" in x]
    gpu = torch.cuda.is_available()
    result = {"trl_version": trl.__version__, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
              "sequences_per_step": sequences,
              "step_seconds_all": steps, "step_seconds": sum(steady) / len(steady),
              "completion_len_mean": [x.get("completions/mean_length") for x in logs],
              "trainer_peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else None, "log_history": trainer.state.log_history}
    print(json.dumps({k: v for k, v in result.items() if k != "log_history"}), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
