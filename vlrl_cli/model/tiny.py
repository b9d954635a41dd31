"""`vlrl tiny-model`: a random few-MB VLM of a real Qwen-VL architecture, built offline.

Real architecture classes from `transformers` (so mrope, window attention, deepstack, placeholder
expansion all run the real code), a byte-level BPE tokenizer trained here with `tokenizers` on a small
built-in corpus, the Qwen special tokens, and a chat template in the Qwen format. Loadable with
AutoProcessor / AutoModelForImageTextToText and by vLLM. Head sizes are 64 so GPU attention kernels
accept them.
"""

from __future__ import annotations

from pathlib import Path

from .families import FAMILIES, REAL_SIZES, real_size_config
from ..errors import UserError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen's chat format. `content` may be a string or a list of parts; image parts (OpenAI `image_url` or
# transformers' `image`) become one placeholder that the processor expands to the image's token count.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ('image', 'image_url') -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def _corpus() -> list[str]:
    """Text the tokenizer learns its merges from: the tasks' vocabulary, numbers, LaTeX, moves."""
    from ..data.sources.colors import COLORS, question
    from ..data.sources.geometry3k import INSTRUCTION

    words = list(COLORS) + ["up", "down", "left", "right", "move", "goal", "wall", "maze", "answer", "the",
                            "find", "angle", "triangle", "circle", "square", "area", "length", "x", "y"]
    lines = [question(list(COLORS)[:n]) for n in range(2, len(COLORS) + 1)]
    lines += [INSTRUCTION, "\\boxed{12}", "\\frac{1}{2} \\sqrt{3} \\angle ABC = 60^\\circ", "Move: up"]
    lines += [" ".join(words)] + [str(i) for i in range(200)]
    lines += ["system", "user", "assistant", "You are a helpful assistant."]
    return lines * 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def _configs(family: str, vocab: int, ids: dict[str, int]):
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=8192, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}
        vision = dict(depth=2, embed_dim=128, hidden_size=128, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                      fullatt_block_indexes=[1], window_size=112)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [8, 12, 12], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                      num_position_embeddings=256, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    raise UserError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def _processor(family: str, tokenizer, min_pixels: int | None, max_pixels: int | None):
    from transformers import Qwen2VLImageProcessor

    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        ip = Qwen2VLImageProcessor(patch_size=16, merge_size=2, min_pixels=min_pixels or 32 * 32 * 4,
                                   max_pixels=max_pixels or 32 * 32 * 1280, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return Qwen3VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(),
                                chat_template=CHAT_TEMPLATE)
    from transformers import Qwen2VLVideoProcessor

    from ..data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    ip = Qwen2VLImageProcessor(min_pixels=min_pixels or DEFAULT_MIN_PIXELS, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    if family == "qwen2_vl":
        from transformers import Qwen2VLProcessor as Proc
    else:
        from transformers import Qwen2_5_VLProcessor as Proc
    return Proc(image_processor=ip, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def build_tiny_model(out: str | Path, family: str = "qwen2_5_vl", seed: int = 0,
                     min_pixels: int | None = None, max_pixels: int | None = None) -> Path:
    """Write a tiny random VLM (weights, config, processor, tokenizer, chat template) to `out`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    out = Path(out)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _configs(family, len(tokenizer), ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _processor(family, tokenizer, min_pixels, max_pixels).save_pretrained(out)
    return out


def build_real_size_model(out: str | Path, size: str = "qwen2_5_vl_3b", seed: int = 0, device: str = "cuda") -> Path:
    """A random model of a released size (families.REAL_SIZES) in bf16, with the local tokenizer and processor."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if size not in REAL_SIZES:
        raise UserError(f"unknown size {size!r}; choose from {', '.join(REAL_SIZES)}")
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = real_size_config(size, ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _processor(REAL_SIZES[size][0], tokenizer, None, None).save_pretrained(out)
    return out
