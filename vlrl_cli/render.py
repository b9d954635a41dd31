"""The one preprocessing path: a record's chat messages -> prompt token ids + image tensors.

Everything that turns messages into model inputs goes through `render_prompt`: validate (to count
tokens exactly), rollouts, training and check-drift. The processor runs once per prompt; whatever it
produced is what the engine generates from and what the trainer scores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .images import ImageLimits, image_from_uri
from .records import content_parts


@dataclass
class RenderedPrompt:
    input_ids: list[int]
    images: list  # PIL images in prompt order
    tensors: dict[str, Any]  # processor outputs besides ids (pixel_values, image_grid_thw, ...)
    num_image_tokens: int  # placeholder tokens in input_ids after expansion
    expected_image_tokens: int  # what the image grids imply

    @property
    def length(self) -> int:
        return len(self.input_ids)


def load_processor(name_or_path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name_or_path)


def image_factor(processor) -> int:
    """Side length the model's vision tower needs images to be a multiple of (patch x merge)."""
    ip = processor.image_processor
    return int(ip.patch_size) * int(getattr(ip, "merge_size", 1))


def pixel_bounds(processor) -> tuple[int, int]:
    size = processor.image_processor.size
    get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
    return int(get("shortest_edge") or get("min_pixels")), int(get("longest_edge") or get("max_pixels"))


def split_messages(messages: list[dict], limits: ImageLimits = ImageLimits(),
                   decoded: list | None = None) -> tuple[list[dict], list]:
    """Template messages (image parts as {"type": "image"}) and the decoded images, in order.

    `decoded`: the prompt's images already decoded by the caller, in order (not decoded twice).
    Works on a deep copy: chat templating rewrites the messages it is given, and the caller's
    messages (which may go to vLLM as OpenAI-style image_url parts) must stay as they were.
    """
    out, images = [], []
    for msg in copy.deepcopy(messages):
        parts = []
        for part in content_parts(msg["content"]):
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                images.append(decoded[len(images)] if decoded is not None else image_from_uri(url, limits))
                parts.append({"type": "image"})
            elif part.get("type") == "image" and "image" in part:
                images.append(part["image"])
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out, images


def render_prompt(processor, messages: list[dict], add_generation_prompt: bool = True,
                  limits: ImageLimits = ImageLimits(), decoded: list | None = None) -> RenderedPrompt:
    template_messages, images = split_messages(messages, limits, decoded)
    text = processor.apply_chat_template(template_messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    batch = processor(text=[text], images=images or None, return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    tensors = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    image_token_id = processor.image_token_id
    merge = int(getattr(processor.image_processor, "merge_size", 1))
    grid = tensors.get("image_grid_thw")
    expected = int(grid.prod(dim=-1).sum().item()) // (merge * merge) if grid is not None else 0
    return RenderedPrompt(ids, images, tensors, sum(1 for t in ids if t == image_token_id), expected)
