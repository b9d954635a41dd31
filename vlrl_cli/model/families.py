"""The model families vlrl supports and the released sizes it knows offline.

REAL_SIZES are the configs of released checkpoints (text and vision towers at their real shapes). GPU
benchmarks and the shipped recipes' at-shape runs build them with random weights (`build_real_size_model`),
so speed and memory are real while no download is needed; `vlrl train --plan` and the recipe checks read
them for hub ids without the network.
"""

from __future__ import annotations

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
_QWEN25_TEXT = dict(max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
_QWEN3_TEXT = dict(max_position_embeddings=262144, rms_norm_eps=1e-6, head_dim=128, vocab_size=151936,
                   rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                    "mrope_interleaved": True})
_QWEN3_VISION = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                     hidden_act="gelu_pytorch_tanh", num_heads=16)

# size -> (family, text config, vision config): the values of the released checkpoints' config.json
REAL_SIZES = {
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
}

# the hub ids of those checkpoints (lower case), for configs without the network
HUB_IDS = {"qwen/qwen2.5-vl-3b-instruct": "qwen2_5_vl_3b", "qwen/qwen2.5-vl-7b-instruct": "qwen2_5_vl_7b",
           "qwen/qwen3-vl-2b-instruct": "qwen3_vl_2b", "qwen/qwen3-vl-4b-instruct": "qwen3_vl_4b",
           "qwen/qwen3-vl-8b-instruct": "qwen3_vl_8b"}


def config_class(family: str):
    import transformers

    return {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig,
            "qwen3_vl": transformers.Qwen3VLConfig}[family]


def real_size_config(size: str, ids: dict[str, int] | None = None):
    """The config of a released size (REAL_SIZES); `ids`: the special tokens' ids of the local tokenizer
    (None: shapes only, as `vlrl train --plan` needs them)."""
    family, text, vision = REAL_SIZES[size]
    text, special = dict(text), {}
    if ids is not None:
        text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                       vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return config_class(family)(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                                **special)


def known_config(path: str):
    """The config of a released size named by its hub id (HUB_IDS), or None."""
    size = HUB_IDS.get(path.lower())
    return real_size_config(size) if size is not None else None
