"""Rollout engines, one interface: generate (ids + log-probs of sampled tokens), update weights, sleep/wake.

- `hf`: transformers generation; runs anywhere (CPU tests, the demo).
- `vllm`: an in-process vLLM engine per GPU rank, colocated with the trainer (GPU only).
Both take exactly the token ids and image tensors the trainer will score (see render.py), so the
trainer never re-tokenises what the engine saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0


@dataclass
class GenRequest:
    input_ids: list[int]
    tensors: dict[str, Any] = field(default_factory=dict)  # pixel_values, image_grid_thw, ...
    n: int = 1
    messages: list[dict] | None = None  # the chat the ids were rendered from (vLLM needs the images)


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under softmax(logits / temperature), engine side
    finish_reason: str  # stop | length


def make_engine(name: str, model_path: str, processor, **kwargs):
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(model_path, processor, **kwargs)
    if name == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(model_path, processor, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r} (hf or vllm)")


def placeholder_token_ids(processor) -> list[int]:
    """Tokens the model must never sample: image/video placeholders and vision delimiters."""
    tok = processor.tokenizer
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    ids = {tok.convert_tokens_to_ids(n) for n in names}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)
