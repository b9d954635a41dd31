"""LoRA (PEFT) on the policy: which layers get adapters, and the merged weights the rollout engine gets.

Only the adapters train; the rollout engine (hf or vllm) holds the full model and receives, after every
optimizer step, the merged weights W + scale * B A under the model's own parameter names, through the same
sync as a full fine-tune (weights.export_weights). So the engine samples from exactly the current policy
and there is no adapter state on its side that could go stale or be half-applied.

Default targets: the language model's attention and MLP projections, matched by a regex on the full module
name (PEFT's short names `gate_proj`, `up_proj`, ... also match the Qwen-VL vision tower's MLP).
`vision: true` adds the vision tower's attention and MLP projections; the projector (merger) stays frozen.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import UserError

LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_PROJECTIONS = ("qkv", "proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "linear_fc1", "linear_fc2")


def target_regex(target_modules: list[str] | None, vision: bool) -> str:
    """PEFT's target_modules as one regex over full module names."""
    lm = "|".join(target_modules or LM_PROJECTIONS)
    pattern = rf".*language_model\..*\.({lm})"
    if vision:
        pattern += rf"|.*visual\.blocks\..*\.({'|'.join(VISION_PROJECTIONS)})"
    return pattern


def wrap(model, cfg):
    """The model with LoRA adapters (a PeftModel); only adapter parameters require grad.

    cfg: the recipe's model.lora (rank, alpha, dropout, target_modules, vision). A target list that
    matches no module is a UserError naming the key, raised before anything moves to a GPU.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=target_regex(cfg.target_modules, cfg.vision), bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "not found" in str(e) or "Target modules" in str(e):
            raise UserError(f"model.lora.target_modules {cfg.target_modules or list(LM_PROJECTIONS)} matches no "
                            f"module of the language model{' or vision tower' if cfg.vision else ''}") from None
        raise


def is_lora(module) -> bool:
    return hasattr(module, "peft_config")


def merged_named_parameters(module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the full model with every adapter merged in (W + scale * B A), under the names
    of the plain transformers model: what an engine, a checkpoint's hf/ folder or vLLM loads."""
    from peft.tuners.lora import LoraLayer

    inner = module.base_model.model
    layers = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if ".lora_" in name:
                continue
            if name.endswith(".base_layer.weight"):
                layer = name[: -len(".base_layer.weight")]
                delta = sum(layers[layer].get_delta_weight(a) for a in layers[layer].active_adapters)
                yield layer + ".weight", (p + delta.to(p.dtype)).detach()
            else:
                yield name.replace(".base_layer.", "."), p.detach()


def merged_model(module):
    """The plain transformers model (the wrapped one's own object) and a state dict of merged weights."""
    return module.base_model.model, dict(merged_named_parameters(module))
