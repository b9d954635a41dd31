"""The one preprocessing path: chat messages -> token ids + image tensors -> the model's keyword inputs.

Everything that turns messages into model inputs goes through here: validate (to count tokens exactly),
rollouts, SFT, the trainer's batches, the hf engine and check-drift. The processor runs once per prompt;
whatever it produced is what the engine generates from and what the trainer scores.

This is the only module that knows the processor's output keys. A sequence's per-image tensors
(`image_inputs`: pixel_values, image_grid_thw, ...) travel with its token ids; the per-token inputs
(attention mask, `mm_token_type_ids`, from which the model computes M-RoPE positions) are rebuilt by
`model_inputs` for the whole sequence (prompt, responses, observations) at forward time. Qwen2-VL and
Qwen3-VL refuse image inputs without `mm_token_type_ids`; Qwen2.5-VL silently falls back to 1-D
positions, so every family gets it, always.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..data.images import ImageLimits, image_from_uri
from ..data.records import content_parts

# processor outputs with one value per token; everything else it returns is per image
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# what image processors return beside the model's inputs (Gemma 4's own processor drops these itself)
NOT_MODEL_INPUTS = ("num_soft_tokens_per_image", "num_soft_tokens_per_video")


@dataclass
class RenderedPrompt:
    input_ids: list[int]
    images: list  # PIL images in prompt order
    tensors: dict[str, Any]  # per-image processor outputs (image_inputs): pixel_values, image_grid_thw, ...
    num_image_tokens: int  # placeholder tokens in input_ids after expansion
    expected_image_tokens: int  # what the image grids imply

    @property
    def length(self) -> int:
        return len(self.input_ids)



def image_factor(processor) -> int:
    """Side length the model's vision tower needs images to be a multiple of (patch x merge; Gemma 4: patch x
    pooling)."""
    ip = processor.image_processor
    return int(ip.patch_size) * int(getattr(ip, "merge_size", None) or getattr(ip, "pooling_kernel_size", 1))


def pixel_bounds(processor) -> tuple[int, int]:
    """(min, max) pixels an image keeps as it is. A processor with a soft-token budget (Gemma 4) scales every
    image to fill it, so only sizes at the budget are kept: (budget, budget)."""
    ip = processor.image_processor
    if getattr(ip, "max_soft_tokens", None):
        side = image_factor(processor)
        return side * side, int(ip.max_soft_tokens) * side * side
    size = ip.size
    get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
    return int(get("shortest_edge") or get("min_pixels")), int(get("longest_edge") or get("max_pixels"))


def processor_size(processor, width: int, height: int) -> tuple[int, int]:
    """The (width, height) the model's image processor turns a width x height image into."""
    ip = processor.image_processor
    if getattr(ip, "max_soft_tokens", None):  # Gemma 4: aspect ratio kept, scaled to the token budget
        from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

        pool = int(ip.pooling_kernel_size)
        h, w = get_aspect_ratio_preserving_size(height=height, width=width, patch_size=int(ip.patch_size),
                                                max_patches=int(ip.max_soft_tokens) * pool * pool,
                                                pooling_kernel_size=pool)
        return w, h
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    lo, hi = pixel_bounds(processor)
    h, w = smart_resize(height, width, factor=image_factor(processor), min_pixels=lo, max_pixels=hi)
    return w, h


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
    tensors = image_inputs(batch)
    expected = sum(image_token_counts(processor, tensors))
    return RenderedPrompt(ids, images, tensors, sum(1 for t in ids if t == processor.image_token_id), expected)


def render_text(processor, text: str, images: list) -> tuple[list[int], dict]:
    """Token ids and per-image tensors of already-templated text (a multi-turn delta)."""
    batch = processor(text=[text], images=images or None, return_tensors="pt")
    return batch["input_ids"][0].tolist(), image_inputs(batch)


def image_inputs(processor_output) -> dict[str, torch.Tensor]:
    """The per-image tensors of a processor's (or image processor's) output: what the model takes (an image
    processor's bookkeeping, e.g. Gemma 4's `num_soft_tokens_per_image`, is not a model input)."""
    return {k: v for k, v in dict(processor_output).items() if k not in PER_TOKEN_KEYS + NOT_MODEL_INPUTS}


def concat_image_inputs(parts) -> dict[str, torch.Tensor]:
    """Image tensors of several sequences (or turns) as one set, in order."""
    out: dict[str, list] = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v, dim=0) for k, v in out.items()}


def image_token_counts(processor, tensors: dict) -> list[int]:
    """Placeholder tokens each image expands to: Qwen-VL, its patch grid t*h*w over merge^2; Gemma 4, its
    real (unpadded) patches over pooling^2."""
    grid = tensors.get("image_grid_thw")
    if grid is not None:
        merge = int(getattr(processor.image_processor, "merge_size", 1))
        return [int(v) for v in (grid.prod(dim=-1) // (merge * merge)).tolist()]
    positions = tensors.get("image_position_ids")  # [images, patches, 2]; (-1, -1) pads a row
    if positions is not None:
        pool = int(processor.image_processor.pooling_kernel_size)
        return [int(v) for v in ((positions >= 0).all(-1).sum(-1) // (pool * pool)).tolist()]
    return []


def per_image(tensors: dict) -> list[tuple[tuple[int, int, int], torch.Tensor]]:
    """(grid, pixel rows) per image, as the vision tower receives them (split_tower_input)."""
    pixels = tensors.get("pixel_values")
    second = tensors.get("image_grid_thw", tensors.get("image_position_ids"))
    if pixels is None or second is None:
        return []
    return split_tower_input(pixels, second)


def split_tower_input(pixels, second) -> list[tuple[tuple[int, int, int], Any]]:
    """A vision tower's input split per image: (grid, pixel rows) each.

    Qwen-VL: `second` is the grids [images, 3] and `pixels` their patch rows concatenated (t*h*w rows an image).
    Gemma 4: `second` is the patch positions [images, patches, 2] ((x, y), (-1, -1) on padding) and `pixels`
    [images, patches, dim]; an image's rows are its real patches, its grid (1, rows, columns)."""
    if hasattr(second, "dim") and second.dim() == 3:
        out = []
        for px, pos in zip(pixels, second):
            real = (pos >= 0).all(-1)
            used = pos[real]
            grid = (1, int(used[:, 1].max()) + 1, int(used[:, 0].max()) + 1) if len(used) else (1, 0, 0)
            out.append((grid, px[real]))
        return out
    return split_by_grid(pixels, second.tolist() if hasattr(second, "tolist") else second)


def split_by_grid(pixels, grid) -> list[tuple[tuple[int, int, int], Any]]:
    """Concatenated patch rows -> (grid, rows) per image; an image of grid (t, h, w) has t*h*w rows."""
    out, start = [], 0
    for g in grid:
        g = tuple(int(v) for v in g)
        rows = g[0] * g[1] * g[2]
        out.append((g, pixels[start:start + rows]))
        start += rows
    return out


def mm_token_type_ids(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video per position (what the processor returns for its own ids, rebuilt for any)."""
    types = torch.zeros_like(input_ids)
    types[input_ids == processor.image_token_id] = 1
    video = getattr(processor, "video_token_id", None)
    if video is not None:
        types[input_ids == video] = 2
    return types


def model_inputs(processor, input_ids: torch.Tensor, attention_mask: torch.Tensor, tensors: dict,
                 device: torch.device | str, dtype: torch.dtype | None = None) -> dict:
    """The model's keyword inputs for [B, T] token sequences and their images (all rows', in order).

    Floating image tensors are cast to `dtype` (the model's) when given.
    """
    out = {"input_ids": input_ids.to(device), "mm_token_type_ids": mm_token_type_ids(processor, input_ids).to(device)}
    if attention_mask is not None:  # None: packed sequences (their boundaries come from position_ids)
        out["attention_mask"] = attention_mask.to(device)
    for k, v in tensors.items():
        out[k] = v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
    return out


def render_chunks(processor, chunks, limits: ImageLimits = ImageLimits(), vocab_size: int | None = None
                  ) -> tuple[list[int], dict, list]:
    """Token ids and image tensors of a Tinker model input (serve): text chunks' tokens as given; each image
    chunk becomes exactly as many placeholder positions as the model's image processor makes of it, which
    must be the chunk's expected_tokens. Returns (ids, image tensors, decoded images). Raises ValueError
    naming both counts, or a bad token id."""
    from ..data.images import open_image

    images, pieces = [], []
    for c in chunks:
        if hasattr(c, "tokens"):
            bad = [t for t in c.tokens if t < 0 or (vocab_size is not None and t >= vocab_size)]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
            pieces.append(list(c.tokens))
        else:
            images.append(open_image(c.data, limits))  # bounded decode: no decompression bombs
            pieces.append(None)
    tensors = image_inputs(processor.image_processor(images=images, return_tensors="pt")) if images else {}
    counts = iter(image_token_counts(processor, tensors))
    ids, k = [], 0
    for c, piece in zip(chunks, pieces):
        if piece is not None:
            ids += piece
            continue
        n = next(counts)
        if c.expected_tokens is not None and c.expected_tokens != n:
            raise ValueError(f"image chunk {k}: expected_tokens is {c.expected_tokens} but the model's image "
                             f"processor makes {n} positions of this {images[k].width}x{images[k].height} image")
        ids += [processor.image_token_id] * n
        k += 1
    return ids, tensors, images
