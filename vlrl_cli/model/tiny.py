"""`vlrl tiny-model`: a random few-MB VLM of a real architecture (families.FAMILY), built offline.

Real architecture classes from `transformers` (so mrope, window attention, deepstack, placeholder
expansion all run the real code), a byte-level BPE tokenizer trained here with `tokenizers` on a small
built-in corpus, the Qwen special tokens, and a chat template in the Qwen format. Loadable with
AutoProcessor / AutoModelForImageTextToText and by vLLM. Head sizes are 64 so GPU attention kernels
accept them.
"""

from __future__ import annotations

from pathlib import Path

from .families import FAMILIES, FAMILY, REAL_SIZES, real_size_config
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
    """The tiny config of a family: its declaration's text and vision settings on a shared small base."""
    import transformers

    f = FAMILY[family]
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=8192, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
                **f.tiny_text)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return getattr(transformers, f.config_class)(text_config=text, vision_config=dict(f.tiny_vision), **tokens)


def _processor(family: str, tokenizer, min_pixels: int | None, max_pixels: int | None):
    """The family's own processor class around the local tokenizer, with its image grid and normalisation."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    from ..data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    f = FAMILY[family]
    low, high = f.tiny_pixels or (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    norm = {k: list(v) for k, v in (("image_mean", f.image_mean), ("image_std", f.image_std)) if v is not None}
    ip = Qwen2VLImageProcessor(patch_size=f.patch_size, merge_size=f.merge_size, min_pixels=min_pixels or low,
                               max_pixels=max_pixels or high, **norm)
    return getattr(transformers, f.processor_class)(image_processor=ip, tokenizer=tokenizer,
                                                    video_processor=getattr(transformers, f.video_processor_class)(),
                                                    chat_template=CHAT_TEMPLATE)


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
