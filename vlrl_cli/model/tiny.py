"""`vlrl tiny-model`: a random few-MB VLM of a real architecture (families.FAMILY), built offline.

Real architecture classes from `transformers` (so mrope, window attention, deepstack, placeholder
expansion all run the real code), a byte-level BPE tokenizer trained here with `tokenizers` on a small
built-in corpus, the family's special tokens, and a chat template in the family's format. Loadable with
AutoProcessor / AutoModelForImageTextToText and by vLLM. Head sizes are 64 so GPU attention kernels
accept them.
"""

from __future__ import annotations

from pathlib import Path

from .families import FAMILIES, FAMILY, REAL_SIZES, real_size_config
from ..errors import UserError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

def _chat_template(start: str, role: str, end: str, image: str, generation: str, first: str = "",
                   newline: str = "\n") -> str:
    """A chat format: `content` may be a string or a list of parts; image parts (OpenAI `image_url` or
    transformers' `image`) become one placeholder that the processor expands to the image's token count.
    `newline`: what follows a role and an end of turn. A literal newline there is eaten by the next `{%-` tag
    (the Qwen tiny models' format has none, kept so their tokens never change); `{{ '\\n' }}` survives."""
    return (
        f"{first}{{%- for message in messages -%}}{start}{role}{newline}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        f"{{%- elif part['type'] in ('image', 'image_url') -%}}{image}"
        f"{{%- endif -%}}{{%- endfor -%}}{{%- endif -%}}{end}{newline}"
        f"{{%- endfor -%}}{{%- if add_generation_prompt -%}}{generation}{{%- endif -%}}"
    )


CHAT_TEMPLATES = {
    # Qwen's: <|im_start|>role ... <|im_end|>
    "qwen": _chat_template("<|im_start|>", "{{ message['role'] }}", "<|im_end|>",
                           "<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant\n"),
    # Gemma 4's: <bos>, then <|turn>role\n ... <turn|>\n with the assistant called "model" (its thinking
    # channel is left out: the tiny model never thinks)
    "gemma": _chat_template("<|turn>", "{{ 'model' if message['role'] == 'assistant' else message['role'] }}",
                            "<turn|>", "<|image|>", "<|turn>model{{ '\\n' }}", first="{{ bos_token }}",
                            newline="{{ '\\n' }}"),
}
CHAT_TEMPLATE = CHAT_TEMPLATES["qwen"]


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


def build_tokenizer(family: str = "qwen2_5_vl"):
    """vlrl's byte-level BPE with the Qwen special tokens; a family whose tokens differ gets its own added
    after them (so every Qwen tokenizer stays byte for byte what it was)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    f = FAMILY[family]
    if f.chat_format == "qwen":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       chat_template=CHAT_TEMPLATE)
    # Gemma 4: its turn markers, its image/audio placeholders under the names its processor reads
    # (tokenizer.image_token, .boi_token, ...), and <|video|>, which its processor adds
    named = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
             "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f.tokens["bos"], eos_token=f.tokens["eos"],
                                   pad_token=f.tokens["pad"], extra_special_tokens=named,
                                   chat_template=CHAT_TEMPLATES[f.chat_format])
    extra = [f.tokens["bos"], "<|turn>", f.tokens["eos"], *named.values(), "<|video|>"]
    fast.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    return fast


def special_ids(tokenizer, family: str) -> dict[str, int]:
    """token -> id of the tokens the family's config names."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in FAMILY[family].tokens.values()}


def _configs(family: str, vocab: int, ids: dict[str, int]):
    """The tiny config of a family: its declaration's text and vision settings on a shared small base."""
    import transformers

    from .families import token_ids

    f = FAMILY[family]
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=8192, tie_word_embeddings=False,
                **token_ids(family, ids, text=True))
    text.update(f.tiny_text)
    if "hidden_size_per_layer_input" in text:  # Gemma 4's per-layer input embeddings are
        text["vocab_size_per_layer_input"] = vocab  # sized by the vocabulary
    return getattr(transformers, f.config_class)(text_config=text, vision_config=dict(f.tiny_vision),
                                                 tie_word_embeddings=text["tie_word_embeddings"],
                                                 **token_ids(family, ids), **f.config_extra)


def _processor(family: str, tokenizer, min_pixels: int | None, max_pixels: int | None, soft_tokens: int = 70):
    """The family's own processor class around the local tokenizer, with its image grid and normalisation.
    soft_tokens: Gemma 4's image budget (its vision config's default_output_length, as the releases pair them)."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    from ..data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    f = FAMILY[family]
    template = CHAT_TEMPLATES[f.chat_format]
    video = getattr(transformers, f.video_processor_class)()
    if family == "gemma4":
        # every image is scaled to the token budget (the tiny model: 70 soft tokens, the smallest Gemma 4 offers;
        # a released size: its own, 280); no audio
        from transformers import Gemma4ImageProcessor
        from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

        return transformers.Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                                            image_processor=Gemma4ImageProcessor(max_soft_tokens=soft_tokens),
                                            tokenizer=tokenizer, video_processor=video, chat_template=template)
    low, high = f.tiny_pixels or (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    norm = {k: list(v) for k, v in (("image_mean", f.image_mean), ("image_std", f.image_std)) if v is not None}
    ip = Qwen2VLImageProcessor(patch_size=f.patch_size, merge_size=f.merge_size, min_pixels=min_pixels or low,
                               max_pixels=max_pixels or high, **norm)
    return getattr(transformers, f.processor_class)(image_processor=ip, tokenizer=tokenizer, video_processor=video,
                                                    chat_template=template)


def build_tiny_model(out: str | Path, family: str = "qwen2_5_vl", seed: int = 0,
                     min_pixels: int | None = None, max_pixels: int | None = None) -> Path:
    """Write a tiny random VLM (weights, config, processor, tokenizer, chat template) to `out`."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from .loading import save_model

    hf_logging.disable_progress_bar()

    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    out = Path(out)
    tokenizer = build_tokenizer(family)
    config = _configs(family, len(tokenizer), special_ids(tokenizer, family))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = _generation_config(config)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    _processor(family, tokenizer, min_pixels, max_pixels).save_pretrained(out)
    return out


def build_real_size_model(out: str | Path, size: str = "qwen2_5_vl_3b", seed: int = 0, device: str = "cuda") -> Path:
    """A random model of a released size (families.REAL_SIZES) in bf16, with the local tokenizer and processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .loading import save_model

    if size not in REAL_SIZES:
        raise UserError(f"unknown size {size!r}; choose from {', '.join(REAL_SIZES)}")
    family = REAL_SIZES[size][0]
    tokenizer = build_tokenizer(family)
    config = real_size_config(size, special_ids(tokenizer, family))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config = _generation_config(config)
    temper_unscaled_attention(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    budget = getattr(config.vision_config, "default_output_length", None) or 70
    _processor(family, tokenizer, None, None, soft_tokens=budget).save_pretrained(out)
    return out


def temper_unscaled_attention(model) -> int:
    """Random weights for attention that does not divide its scores by sqrt(head size) (Gemma 4: scaling 1.0,
    its trained q/k norm weights carry the scale). With norm weights of one the scores spread by ~sqrt(d) (16
    and 23 at E2B's 256 and 512), attention is all or nothing, and two bf16 kernels (vLLM's, the trainer's)
    part by ~0.6 nats a token, where the same model scaled by 1/sqrt(d) parts by 0.03: a benchmark's drift
    would measure the random weights, not the code. Norm weights of d^-1/4 on queries and keys give the usual
    spread. Returns how many norms it set."""
    import torch

    n = 0
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "scaling", None) != 1.0:
                continue
            for norm in (getattr(module, "q_norm", None), getattr(module, "k_norm", None)):
                weight = getattr(norm, "weight", None)
                if weight is not None:
                    weight.fill_(weight.numel() ** -0.25)
                    n += 1
    return n


def _generation_config(config):
    """Stop at the end of a turn or the pad token; nothing else (no sampling settings a model's generation
    config could impose on the engines)."""
    from transformers import GenerationConfig

    text = config.text_config
    return GenerationConfig(eos_token_id=[text.eos_token_id, text.pad_token_id], pad_token_id=text.pad_token_id,
                            bos_token_id=text.bos_token_id)
