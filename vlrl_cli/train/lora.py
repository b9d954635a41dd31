"""LoRA (PEFT) on the policy: which layers get adapters, and the merged weights the rollout engine gets.

Only the adapters train; the rollout engine (hf or vllm) holds the full model and receives, after every
optimizer step, the merged weights W + scale * B A under the model's own parameter names, through the same
sync as a full fine-tune (weights.export_weights). So the engine samples from exactly the current policy
and there is no adapter state on its side that could go stale or be half-applied.

Default targets: the language model's attention and MLP projections, matched by a regex on the full module
name (PEFT's short names `gate_proj`, `up_proj`, ... also match the Qwen-VL vision tower's MLP). Where the text
model routes tokens to experts (Qwen3-VL-MoE), those are attention only: the experts are 3-D weight tensors.
`vision: true` adds the vision tower's attention and MLP projections and the projector's (the merger that
maps patch features into the language model), and the patch embedding (a 3-D convolution over pixel
patches: the only layer that sees colours as colours).
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import UserError

LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_regex(target_modules: list[str] | None, vision: bool, config) -> str:
    """PEFT's target_modules as one regex over full module names. The vision tower's names come from the
    model's family declaration (config: the model's config or model_type). In a text model with routed
    experts the default names match attention only: the experts are 3-D weights, not linear layers."""
    from ..model.families import family_of

    f = family_of(config)
    lm = "|".join(target_modules or LM_PROJECTIONS + f.linear_projections)
    pattern = rf".*language_model\..*\.({lm})"
    if vision:
        tower = rf".*{f.vision_tower}\."
        pattern += (rf"|{tower}{f.vision_blocks}.*\.({'|'.join(f.vision_projections)})|.*\.{f.projector}"
                    rf"|{tower}{f.patch_embed}")
    return pattern


def wrap(model, cfg):
    """The model with LoRA adapters (a PeftModel); only adapter parameters require grad.

    cfg: the recipe's model.lora (rank, alpha, dropout, target_modules, vision). A target list that
    matches no module is a UserError naming the key, raised before anything moves to a GPU.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=target_regex(cfg.target_modules, cfg.vision, model.config), bias="none")
    try:
        # adapters in the model's dtype: PEFT would make bf16 adapters fp32, and every adapted projection
        # would then cast its input to fp32 and multiply in fp32 (a LoRA training phase slower than a full
        # fine-tune's, measured on an H100). DeepSpeed's bf16 mode keeps fp32 master copies anyway.
        return get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:
        if "not found" in str(e) or "Target modules" in str(e):
            raise UserError(f"model.lora.target_modules {cfg.target_modules or list(LM_PROJECTIONS)} matches no "
                            f"module of the language model{' or vision tower' if cfg.vision else ''}") from None
        raise


def is_lora(module) -> bool:
    return hasattr(module, "peft_config")


def merged_named_parameters(module, changed_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the full model with every adapter merged in (W + scale * B A), under the names
    of the plain transformers model: what an engine, a checkpoint's hf/ folder or vLLM loads.
    changed_only: only the weights training can change (adapted or trainable), for an engine that already
    holds the frozen rest.

    Under ZeRO-3 each weight and its adapters are gathered (every rank must iterate) and copied out."""
    import deepspeed

    inner = module.base_model.model
    params = dict(inner.named_parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params.values())
    scales = _scales(inner)
    with torch.no_grad():
        for name, p in params.items():
            if ".lora_" in name:
                continue
            factors = _factors(name, params, scales)
            if changed_only and not factors and not p.requires_grad:
                continue
            if not zero3:
                yield _merge(name, p, factors)
                continue
            with deepspeed.zero.GatheredParameters([p] + [t for f in factors for t in f[:2]], modifier_rank=None):
                out_name, t = _merge(name, p, factors)
                yield out_name, t.clone()


def merged_state_dict(module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same merge from a full state dict of the wrapped model (ZeRO-3's consolidated one on rank 0)."""
    inner = module.base_model.model
    prefix = "base_model.model."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    scales = _scales(inner)
    out = {}
    with torch.no_grad():
        for name, t in state.items():
            if ".lora_" in name:
                continue
            out_name, merged = _merge(name, t, _factors(name, state, scales))
            out[out_name] = merged
    return out


def _factors(name: str, tensors: dict, scales: dict) -> list:
    """[(A, B, scale)] of every active adapter on the layer whose base weight is `name` ([] for others)."""
    if not name.endswith(".base_layer.weight"):
        return []
    layer = name[: -len(".base_layer.weight")]
    return [(tensors[f"{layer}.lora_A.{a}.weight"], tensors[f"{layer}.lora_B.{a}.weight"], s)
            for a, s in scales[layer].items()]


def _scales(inner) -> dict[str, dict[str, float]]:
    """{layer name: {active adapter: alpha / rank}} of every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: {a: m.scaling[a] for a in m.active_adapters}
            for name, m in inner.named_modules() if isinstance(m, LoraLayer)}


def _merge(name: str, weight: torch.Tensor, factors) -> tuple[str, torch.Tensor]:
    """W + sum(scale * B A) in fp32, returned in W's dtype, under the plain model's parameter name."""
    if not factors:
        return name.replace(".base_layer.", "."), weight.detach()
    # flatten(1): a convolution's factors are A [r, in, *kernel] and B [out, r, 1, ...]; a linear's are 2-D already
    merged = weight.float() + sum(s * (b.float().flatten(1) @ a.float().flatten(1)).reshape(weight.shape)
                                  for a, b, s in factors)
    return name[: -len(".base_layer.weight")] + ".weight", merged.to(weight.dtype)


def merged_model(module, state: dict[str, torch.Tensor] | None = None):
    """The plain transformers model (the wrapped one's own object) and a state dict of merged weights
    (from `state`, a full state dict of the wrapped model, when given; else from the live parameters)."""
    inner = module.base_model.model
    if state is not None:
        return inner, merged_state_dict(module, state)
    merged = dict(merged_named_parameters(module))
    # and the persistent buffers a saved model holds (Gemma 4's per-layer scalars): they are not parameters
    saved = inner.state_dict(keep_vars=True)
    for name, buf in inner.named_buffers():
        if name in saved:
            merged.setdefault(name.replace(".base_layer.", "."), buf.detach())
    return inner, merged
