"""A tiny model that answers every chat question with \\boxed{7} or \\boxed{8} (about half each), so that
rl_loop's GSM8K-style groups have rewards that differ and it trains (a random model never writes \\boxed{}).

    python boxed_model.py TINY_MODEL OUT        (the server's venv: transformers, torch)
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer


def main(src: Path, out: Path, steps: int = 60) -> None:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    questions = [f"Tom has {a} apples and gets {b} more. How many apples does he have? Provide a numerical answer "
                 "without units, written inside \\boxed{}." for a in range(1, 7) for b in range(1, 4)]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for step in range(steps):
        batch = []
        for i, q in enumerate(questions[:8]):
            # the cookbook's Qwen3-VL renderer's layout (the tiny chat template has no newlines)
            prompt = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(f"\\boxed{{{7 + (i + step) % 2}}}", add_special_tokens=False)["input_ids"] + [end]
            batch.append((p, a))
        loss = 0.0
        for p, a in batch:
            ids = torch.tensor([p + a])
            labels = torch.tensor([[-100] * len(p) + a])
            loss = loss + model(input_ids=ids, labels=labels).loss / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"boxed model: final loss {loss.item():.3f}", flush=True)
    shutil.copytree(src, out, dirs_exist_ok=True)
    model.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
