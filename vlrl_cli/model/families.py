"""The model families vlrl supports: what each one changes, declared in one place, and the released sizes
vlrl knows offline.

A `Family` holds everything that differs between architectures: the transformers classes, the placeholder
tokens, the image processor's grid, the vision tower's module names (LoRA and freezing), the text model's
linear-attention layers, and the tiny test config. Render, batches, LoRA, the plan, drift and the
engines ask the declaration (`family_of`) instead of naming a family. Adding a family is one declaration
here, a tiny config, and the family in the tests' lists.

REAL_SIZES are the configs of released checkpoints (text and vision towers at their real shapes). GPU
benchmarks and the shipped recipes' at-shape runs build them with random weights (`build_real_size_model`),
so speed and memory are real while no download is needed; `vlrl train --plan` and the recipe checks read
them for hub ids without the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


@dataclass(frozen=True)
class Family:
    name: str  # config.json's model_type
    config_class: str  # transformers class names
    processor_class: str
    video_processor_class: str
    # the image processor's grid: patch size in pixels, patches merged per side into one token, and the
    # normalisation (Qwen3-VL: 16-px patches, mean/std 0.5; Qwen2/2.5-VL: 14-px, CLIP's)
    patch_size: int = 14
    merge_size: int = 2
    image_mean: tuple[float, ...] | None = None  # None: the processor's default
    image_std: tuple[float, ...] | None = None
    tiny_pixels: tuple[int, int] | None = None  # (min, max) pixels of the tiny model; None: vlrl's defaults
    # tokens that stand for images in a prompt; the model must never sample them
    placeholders: tuple[str, ...] = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    # the tokens a config names by id (tiny and real-size models built here): config key -> token; "bos",
    # "eos" and "pad" are the text config's
    tokens: dict = field(default_factory=lambda: dict(_QWEN_TOKENS))
    chat_format: str = "qwen"  # the tiny model's chat template (tiny.CHAT_TEMPLATES)
    # what the processor's expansion of one image placeholder puts around the image tokens (Gemma 4: <|image>
    # and <image|>); an engine that expands placeholders itself (vLLM) takes the prompt without them
    image_wrap: tuple[str, str] | None = None
    vision_tower: str = "visual"  # the tower's attribute on the inner model (model.model.<name>)
    # the tower's submodule that first receives the pixels and their grid (or patch positions), in transformers
    # and vLLM alike: the engines' vision probes hook it ("": the tower itself)
    vision_input: str = ""
    # LoRA with model.lora.vision: the tower's blocks and their projections, the projector (patch features ->
    # text width; a regex on the inner model, which need not be below the tower) and the patch embedding
    vision_blocks: str = r"blocks\."
    vision_projections: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj",
                                           "linear_fc1", "linear_fc2")
    projector: str = r"visual\.(merger|deepstack_merger_list\.\d+)\.(mlp\.[02]|linear_fc1|linear_fc2)"
    patch_embed: str = r"patch_embed\.proj"
    # text positions: "mrope" (Qwen's 3-D rotary positions from get_rope_index, which packing computes per
    # sequence) or "1d" (one position per token)
    positions: str = "mrope"
    # sliding-window layers, where image tokens may attend to each other both ways (Gemma 4, when its config's
    # use_bidirectional_attention is "vision"): a packed row then needs its masks built per layer type
    # (batches.packed_masks), and the varlen kernel (plain causal, no window) is not used for it
    bidirectional_images: bool = False
    # the tower takes vlrl's grouped segment attention (model.attention): towers that attend over padded
    # per-image rows instead of packed segments (Gemma 4) keep their own
    grouped_vision_attention: bool = True
    # hybrid text models: the attribute of a decoder layer that holds linear attention (a recurrent state and a
    # short convolution, which would carry one sequence into the next in a packed row: model.linear_attention
    # runs it per sequence), and its projections, adapted by LoRA's default targets besides attention's and MLP's
    linear_attention: str | None = None
    linear_projections: tuple[str, ...] = ()
    config_extra: dict = field(default_factory=dict)  # more keyword arguments of config_class (Gemma 4: no audio)
    # text config attributes that transformers (>= 5.17) keeps per layer where layers differ, and the flat key
    # under which the family's own config.json names the odd layers' value (Gemma 4: head_dim 256 on sliding
    # layers, global_head_dim 512 on full ones). vLLM reads the flat form (engines.vllm.flat_text_config)
    flat_config: dict = field(default_factory=dict)
    # the image processor's attribute that sets how many soft tokens an image becomes, told to vLLM as an
    # mm_processor_kwargs: vLLM 0.26 sizes Gemma 4's prompt placeholders from the vision config's
    # default_output_length unless told, while its pixels follow the processor's own budget, and a model whose
    # two differ got 256 placeholders for 64 image embeddings (refused at the first generate)
    image_budget: str | None = None
    tiny_text: dict = field(default_factory=dict)  # the tiny model's text and vision config (tiny.py adds the rest)
    tiny_vision: dict = field(default_factory=dict)


_QWEN_TOKENS = dict(bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", image_token_id="<|image_pad|>",
                    video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
                    vision_end_token_id="<|vision_end|>")
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}
_QWEN3_TINY_TEXT = dict(head_dim=64, rope_parameters=dict(_MROPE, mrope_interleaved=True))
_QWEN3_TINY_VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                          num_position_embeddings=256, deepstack_visual_indexes=[0])
_QWEN3_PIXELS = dict(patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                     tiny_pixels=(32 * 32 * 4, 32 * 32 * 1280))

FAMILY = {f.name: f for f in (
    Family("qwen2_vl", "Qwen2VLConfig", "Qwen2VLProcessor", "Qwen2VLVideoProcessor",
           tiny_text=dict(rope_parameters=_MROPE),
           tiny_vision=dict(depth=2, embed_dim=128, hidden_size=128, num_heads=2, mlp_ratio=2)),
    Family("qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor",
           tiny_text=dict(rope_parameters=_MROPE),
           tiny_vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                            fullatt_block_indexes=[1], window_size=112)),
    Family("qwen3_vl", "Qwen3VLConfig", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", **_QWEN3_PIXELS,
           tiny_text=_QWEN3_TINY_TEXT, tiny_vision=_QWEN3_TINY_VISION),
    # Qwen3-VL with routed experts in every text layer (Qwen3-VL-30B-A3B, 235B-A22B): the same vision
    # tower, processor and chat format as Qwen3-VL. The experts are 3-D weight tensors, not linear layers, so
    # LoRA's default targets (lora.target_regex) adapt attention there and leave experts and router frozen.
    Family("qwen3_vl_moe", "Qwen3VLMoeConfig", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", **_QWEN3_PIXELS,
           tiny_text=dict(_QWEN3_TINY_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                          decoder_sparse_step=1, norm_topk_prob=True),
           tiny_vision=_QWEN3_TINY_VISION),
    # Qwen3.5: natively multimodal, three gated-DeltaNet linear-attention layers to one full-attention layer;
    # Qwen3-VL's processor, placeholders and vision tower (without deepstack)
    Family("qwen3_5", "Qwen3_5Config", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", **_QWEN3_PIXELS,
           linear_attention="linear_attn", linear_projections=("in_proj_qkv", "in_proj_z", "out_proj"),
           tiny_text=dict(head_dim=64, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                          linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                          linear_num_value_heads=4,
                          rope_parameters=dict(_MROPE, mrope_section=[2, 3, 3], mrope_interleaved=True,
                                               partial_rotary_factor=0.25)),
           tiny_vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, num_attention_heads=2,
                            out_hidden_size=128, num_position_embeddings=256)),
    # Gemma 4: sliding-window and global layers, 1-D positions, image tokens attending to each other both
    # ways on the sliding layers, a vision tower over 16-px patches pooled 3x3 into soft tokens (each image
    # scaled to the processor's token budget), <|image> <|image|>... <image|> placeholders, tied embeddings
    # and a soft-capped head
    Family("gemma4", "Gemma4Config", "Gemma4Processor", "Gemma4VideoProcessor", patch_size=16, merge_size=3,
           placeholders=("<|image|>", "<|video|>", "<|audio|>", "<|image>", "<image|>", "<|audio>", "<audio|>"),
           tokens=dict(bos="<bos>", eos="<turn|>", pad="<|endoftext|>", image_token_id="<|image|>",
                       boi_token_id="<|image>", eoi_token_id="<image|>", video_token_id="<|video|>",
                       audio_token_id="<|audio|>", boa_token_id="<|audio>", eoa_token_index="<audio|>"),
           chat_format="gemma", image_wrap=("<|image>", "<image|>"), vision_tower="vision_tower",
           vision_input="patch_embedder", vision_blocks=r"encoder\.layers\.",
           vision_projections=tuple(rf"{p}\.linear" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj")),
           projector=r"embed_vision\.embedding_projection", patch_embed=r"patch_embedder\.input_proj",
           positions="1d", bidirectional_images=True, grouped_vision_attention=False,
           config_extra=dict(audio_config=None), flat_config={"head_dim": "global_head_dim"},
           image_budget="max_soft_tokens",
           # E2B's layout in small: per-layer input embeddings, and a last layer that reuses an earlier one's
           # keys and values (num_kv_shared_layers) with the double-wide MLP such layers get
           tiny_text=dict(head_dim=64, global_head_dim=64, sliding_window=128, num_hidden_layers=3,
                          layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                          hidden_size_per_layer_input=16, num_kv_shared_layers=1, use_double_wide_mlp=True,
                          final_logit_softcapping=30.0, use_bidirectional_attention="vision", tie_word_embeddings=True),
           tiny_vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=32, patch_size=16, pooling_kernel_size=3,
                            position_embedding_size=256, default_output_length=70)),
)}
FAMILIES = tuple(FAMILY)


def family_of(config) -> Family:
    """The declaration of a model's family, from its config (or model_type); an architecture vlrl does not
    support is refused here, at load, with the list of those it does."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in FAMILY:
        raise UserError(f"model type {model_type!r} is not supported; vlrl trains {', '.join(FAMILIES)}")
    return FAMILY[model_type]


def vision_tower(model):
    """The vision tower of a transformers model (under PEFT or DeepSpeed wrappers), or None."""
    inner = model
    while not hasattr(inner, "config") and hasattr(inner, "module"):  # a DeepSpeed engine
        inner = inner.module
    name = family_of(inner.config).vision_tower
    for owner in (inner, getattr(inner, "model", None), getattr(getattr(inner, "base_model", None), "model", None)):
        base = getattr(owner, "model", None)
        tower = getattr(base, name, None) if base is not None else None
        if tower is not None:
            return tower
    return None


def placeholder_token_ids(processor) -> list[int]:
    """Tokens the model must never sample: the family's image/video placeholders and vision delimiters."""
    f = family_of_processor(processor)
    tok = processor.tokenizer
    names = f.placeholders if f is not None else Family.placeholders
    ids = {tok.convert_tokens_to_ids(n) for n in names}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)


def image_wrap_ids(processor) -> tuple[int, int] | None:
    """The ids of the tokens the processor puts around an image's placeholder tokens (Family.image_wrap)."""
    f = family_of_processor(processor)
    if f is None or f.image_wrap is None:
        return None
    start, end = (processor.tokenizer.convert_tokens_to_ids(t) for t in f.image_wrap)
    return start, end


def vision_input_module(tower, family: Family):
    """The submodule of a vision tower (transformers' or vLLM's) that receives the pixels first."""
    return tower.get_submodule(family.vision_input) if family.vision_input else tower


def family_of_processor(processor) -> Family | None:
    """The family a processor belongs to (by its class), or None for one vlrl does not know."""
    name = type(processor).__name__
    return next((f for f in FAMILY.values() if f.processor_class == name), None)

_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
_QWEN25_TEXT = dict(max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
_QWEN3_TEXT = dict(max_position_embeddings=262144, rms_norm_eps=1e-6, head_dim=128, vocab_size=151936,
                   rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                    "mrope_interleaved": True})
_QWEN3_VISION = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                     hidden_act="gelu_pytorch_tanh", num_heads=16)

# Qwen3.5: three gated-DeltaNet layers to one full-attention layer (transformers' default layer_types)
_QWEN35_TEXT = dict(max_position_embeddings=262144, rms_norm_eps=1e-6, head_dim=256, vocab_size=248320,
                    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [11, 11, 10],
                                     "mrope_interleaved": True, "partial_rotary_factor": 0.25})
_QWEN35_VISION = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      hidden_act="gelu_pytorch_tanh")
# Gemma 4 E2B: four sliding-window layers to one global layer, the last 20 layers reusing earlier layers' keys
# and values, per-layer input embeddings; its audio tower is left out (vlrl trains on images)
_GEMMA4_E2B_TEXT = dict(vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                        num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
                        sliding_window=512, vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256,
                        num_kv_shared_layers=20, use_double_wide_mlp=True, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0,
                        layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, tie_word_embeddings=True,
                        rope_parameters={"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                            "rope_theta": 1000000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
_GEMMA4_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                      num_key_value_heads=12, head_dim=64, global_head_dim=64, patch_size=16, pooling_kernel_size=3,
                      position_embedding_size=10240, use_clipped_linears=True, standardize=False,
                      default_output_length=280)  # soft tokens per image: vLLM reads it; the processor's default

_QWEN2_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, hidden_act="quick_gelu")
_QWEN2_TEXT = dict(max_position_embeddings=32768, rms_norm_eps=1e-6,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})

# size -> (family, text config, vision config): the values of the released checkpoints' config.json
REAL_SIZES = {
    "qwen2_vl_2b": ("qwen2_vl",
                    dict(_QWEN2_TEXT, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
                    dict(_QWEN2_VISION, hidden_size=1536)),
    "qwen2_vl_7b": ("qwen2_vl",
                    dict(_QWEN2_TEXT, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
                    dict(_QWEN2_VISION, hidden_size=3584)),
    "qwen2_5_vl_3b": ("qwen2_5_vl",
                      dict(_QWEN25_TEXT, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                           num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
                      dict(_QWEN25_VISION, out_hidden_size=2048)),
    "qwen2_5_vl_7b": ("qwen2_5_vl",
                      dict(_QWEN25_TEXT, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
                      dict(_QWEN25_VISION, out_hidden_size=3584)),
    "qwen3_vl_2b": ("qwen3_vl",
                    dict(_QWEN3_TEXT, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, tie_word_embeddings=True),
                    dict(_QWEN3_VISION, depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                         deepstack_visual_indexes=[5, 11, 17])),
    "qwen3_vl_4b": ("qwen3_vl",
                    dict(_QWEN3_TEXT, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True),
                    dict(_QWEN3_VISION, depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560,
                         deepstack_visual_indexes=[5, 11, 17])),
    "qwen3_vl_8b": ("qwen3_vl",
                    dict(_QWEN3_TEXT, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False),
                    dict(_QWEN3_VISION, depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                         deepstack_visual_indexes=[8, 16, 24])),
    # routed experts: 128 per layer, 8 active (30.5 B parameters, 3.3 B active per token); the 8B's vision tower
    "qwen3_vl_30b_a3b": ("qwen3_vl_moe",
                         dict(_QWEN3_TEXT, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                              num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                              norm_topk_prob=True),
                         dict(_QWEN3_VISION, depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=2048,
                              deepstack_visual_indexes=[8, 16, 24])),
    "qwen3_5_0_8b": ("qwen3_5",
                     dict(_QWEN35_TEXT, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                          num_attention_heads=8, num_key_value_heads=2, linear_num_key_heads=16,
                          linear_num_value_heads=16, tie_word_embeddings=True),
                     dict(_QWEN35_VISION, depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, num_attention_heads=12,
                          out_hidden_size=1024)),
    "qwen3_5_4b": ("qwen3_5",
                   dict(_QWEN35_TEXT, hidden_size=2560, intermediate_size=9216, num_hidden_layers=32,
                        num_attention_heads=16, num_key_value_heads=4, linear_num_key_heads=16,
                        linear_num_value_heads=32, tie_word_embeddings=True),
                   dict(_QWEN35_VISION, depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_attention_heads=16,
                        out_hidden_size=2560)),
    "qwen3_5_9b": ("qwen3_5",
                   dict(_QWEN35_TEXT, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                        num_attention_heads=16, num_key_value_heads=4, linear_num_key_heads=16,
                        linear_num_value_heads=32, tie_word_embeddings=False),
                   dict(_QWEN35_VISION, depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_attention_heads=16,
                        out_hidden_size=4096)),
    "gemma4_e2b": ("gemma4", _GEMMA4_E2B_TEXT, _GEMMA4_VISION),
}

# the hub ids of those checkpoints (lower case), for configs without the network
HUB_IDS = {"qwen/qwen2-vl-2b-instruct": "qwen2_vl_2b", "qwen/qwen2-vl-7b-instruct": "qwen2_vl_7b",
           "qwen/qwen2.5-vl-3b-instruct": "qwen2_5_vl_3b", "qwen/qwen2.5-vl-7b-instruct": "qwen2_5_vl_7b",
           "qwen/qwen3-vl-2b-instruct": "qwen3_vl_2b", "qwen/qwen3-vl-4b-instruct": "qwen3_vl_4b",
           "qwen/qwen3-vl-8b-instruct": "qwen3_vl_8b", "qwen/qwen3-vl-30b-a3b-instruct": "qwen3_vl_30b_a3b",
           "qwen/qwen3.5-0.8b": "qwen3_5_0_8b", "qwen/qwen3.5-4b": "qwen3_5_4b", "qwen/qwen3.5-9b": "qwen3_5_9b",
           "google/gemma-4-e2b-it": "gemma4_e2b", "google/gemma-4-e2b": "gemma4_e2b"}


def config_class(family: str):
    import transformers

    return getattr(transformers, FAMILY[family].config_class)


def real_size_config(size: str, ids: dict[str, int] | None = None):
    """The config of a released size (REAL_SIZES); `ids`: the special tokens' ids of the local tokenizer
    (None: shapes only, as `vlrl train --plan` needs them)."""
    family, text, vision = REAL_SIZES[size]
    text, special = dict(text), {}
    if ids is not None:
        text.update(token_ids(family, ids, text=True))
        special = token_ids(family, ids)
    return config_class(family)(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                                **special, **FAMILY[family].config_extra)


def token_ids(family: str, ids: dict[str, int], text: bool = False) -> dict[str, int]:
    """A config's token-id keys for a tokenizer's ids (token -> id): the text config's bos/eos/pad (text=True)
    or the multimodal config's placeholders."""
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}
    tokens = FAMILY[family].tokens
    if text:
        return {names[k]: ids[v] for k, v in tokens.items() if k in names}
    return {k: ids[v] for k, v in tokens.items() if k not in names}


def known_config(path: str):
    """The config of a released size named by its hub id (HUB_IDS), or None."""
    size = HUB_IDS.get(path.lower())
    return real_size_config(size) if size is not None else None
