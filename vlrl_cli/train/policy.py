"""The policy under training: a transformers VLM inside a DeepSpeed engine (ZeRO 0-3), its optimizer
and lr schedule, and the two calls a loop makes on it (backward per micro-batch, optimizer step)."""

from __future__ import annotations

import torch

from ..model.families import family_of
from ..model.linear_attention import check_linear_attention_kernels
from ..model.loading import load_vlm


def persistence_for(world: int, threshold: int | None) -> int:
    """ZeRO-3's stage3_param_persistence_threshold: parameters with fewer elements stay whole on every rank.

    Default (None): DeepSpeed's 100k on several ranks; on one rank every parameter. A one-rank partition is
    the whole model anyway, so partitioning saves no memory there and only adds a gather per module per
    pass. (Measured on an H200 it is not where ZeRO-3's cost lies: its per-module hooks are; see README,
    Performance. One GPU is better served by stage 2.)
    """
    if threshold is not None:
        return threshold
    return 10**15 if world == 1 else 100_000


def uses_cpu_adam(stage: int, offload: bool) -> bool:
    """Whether an offloaded optimizer steps with DeepSpeed's CPU Adam: where a GPU trains, its vectorised step
    is what keeps offload fast. Without CUDA every tensor is on the CPU already, and that op would be a C++
    build at first use (about two minutes on two cores, and a compiler) for the tiny models a CPU trains:
    torch's AdamW steps there."""
    return offload and stage > 0 and torch.cuda.is_available()


def deepspeed_config(stage: int, offload: bool, grad_clip: float, dtype: str, persistence_threshold: int | None = None,
                     grad_accum_fp32: bool = False) -> dict:
    zero: dict = {"stage": stage}
    if stage in (1, 2):  # DeepSpeed's default buckets are 5e8 elements (1 GB each in bf16)
        zero.update(reduce_bucket_size=200_000_000, allgather_bucket_size=200_000_000)
    if offload and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        zero.update(stage3_param_persistence_threshold=persistence_for(world, persistence_threshold),
                    stage3_gather_16bit_weights_on_model_save=True)
    cfg = {
        # we feed our own micro-batches and mark the accumulation boundary ourselves (see backward_step)
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload and stage > 0 and not uses_cpu_adam(stage, offload):
        # torch's AdamW steps the offloaded state; DeepSpeed refuses another optimizer under offload unless told
        cfg["zero_force_ds_cpu_optimizer"] = False
    if grad_accum_fp32:  # trainer.grad_accum_fp32: DeepSpeed's BF16_Optimizer adds micro-batches up in fp32
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then constant or linear decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "linear" and total > warmup:
        return 1.0 - 0.9 * (step - warmup) / max(1, total - warmup - 1)
    return 1.0


def compile_wanted(setting: bool | str, stage: int, on_gpu: bool | None = None) -> bool:
    """model.compile resolved: true / false as given; "auto" compiles on a GPU with ZeRO 0-2.

    Measured on an H200 (3B, 8 x 541-token micro-batches, ZeRO-1): 0.61 s eager, 0.43 s compiled per
    micro-batch; the GRPO step's first step pays ~45 s of compilation (bench/results/gpu_runs/mfu_2026_11_24c)."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    if setting == "auto":
        return on_gpu and stage < 3
    return bool(setting)


def param_groups(params: list[torch.nn.Parameter], max_numel: int = 100_000_000) -> list[dict]:
    """The trainable parameters in optimizer groups of at most ~max_numel elements, in model order.

    Why: ZeRO 1/2 steps one group at a time and makes an fp32 copy of the group's gradients for it. With
    one group that copy is 4 bytes per parameter at the peak of the step (15 GB for a 3B model: the OOM of
    a 3B full fine-tune on an 80 GB GPU); with 100M-element groups it is 0.4 GB."""
    groups, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() > max_numel:
            groups.append({"params": current})
            current, size = [], 0
        current.append(p)
        size += p.numel()
    if current:
        groups.append({"params": current})
    return groups


def prepare_model(model_path: str, dtype: str, attention: str = "auto", packed: bool = False,
                  gradient_checkpointing: bool = False, compile_blocks: bool = False, lora=None,
                  share_images: bool | str = "auto"):
    """The model the trainer trains, before DeepSpeed: loaded, then (in this order, which matters) the packed
    attention, the recompute, the compiled blocks, and last the LoRA adapters around them. check-drift's
    plain trainer comes from here too, so it is the forward `vlrl train` runs."""
    model = load_vlm(model_path, getattr(torch, dtype), attention)
    if share_images != "auto":  # model.share_images; auto keeps load_vlm's choice
        from ..model.image_sharing import share_repeated_images

        share_repeated_images(model, enabled=bool(share_images))
    if packed and attention == "auto":  # trainer.pack_tokens: packed rows through the varlen kernel on a GPU
        from ..model.attention import use_packed_text_attention

        use_packed_text_attention(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if compile_blocks:  # model.compile (recipe.py refuses it with ZeRO-3)
        from ..model.loading import compile_layers

        compile_layers(model)
    if lora is not None and lora.rank > 0:
        from .lora import wrap

        model = wrap(model, lora)
        if gradient_checkpointing:  # checkpointed blocks need an input that requires grad
            model.enable_input_require_grads()
    return model


def build_policy(model_path: str, lr: float, weight_decay: float, warmup: int, stage: int, offload: bool,
                 grad_clip: float, dtype: str, gradient_checkpointing: bool = False, total_steps: int = 0,
                 schedule: str = "constant", persistence_threshold: int | None = None, attention: str = "auto",
                 lora=None, packed: bool = False, compile_blocks: bool = False, grad_accum_fp32: bool = False,
                 share_images: bool | str = "auto"):
    """The policy as a DeepSpeed engine (called `policy` everywhere; "engine" is the rollout engine).

    lora: the recipe's model.lora; with rank >= 1 the model gets adapters (lora.py) and only they reach
    the optimizer. packed: micro-batches will be packed (trainer.pack_tokens; model.attention.packed_text_attention)."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    cfg = deepspeed_config(stage, offload, grad_clip, dtype, persistence_threshold, grad_accum_fp32)
    # transformers' own ZeRO-3 integration: weights are loaded straight into partitions (no full copy per
    # rank) while this object lives. It is process-global, so it is switched off again below: models
    # loaded later (the hf engine's copy, a KL reference) must load whole.
    hf_ds = HfDeepSpeedConfig(cfg) if stage == 3 else None
    model = prepare_model(model_path, dtype, attention, packed, gradient_checkpointing, compile_blocks, lora,
                          share_images)
    if family_of(model.config).linear_attention:  # before the engine starts, not at the first backward
        check_linear_attention_kernels()
    params = param_groups([p for p in model.parameters() if p.requires_grad])  # all of them, or the adapters
    if uses_cpu_adam(stage, offload):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay)
    else:
        # fused: one kernel for every parameter's update instead of a loop of small ones (CUDA only; the
        # check is at the first step, by which time DeepSpeed has moved the parameters to the GPU)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=torch.cuda.is_available())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps, schedule))
    policy, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    if hf_ds is not None:
        unset_hf_deepspeed_config()
    return policy


def backward_step(policy, loss: torch.Tensor, last: bool) -> None:
    """Accumulate gradients over a variable number of micro-batches; the optimizer steps on the last."""
    policy.set_gradient_accumulation_boundary(last)
    policy.backward(loss, scale_wrt_gas=False)


def optimizer_step(policy) -> float | None:
    """Step the optimizer; returns the global gradient norm (before clipping).

    DeepSpeed reports the norm for ZeRO 1-3 and bf16; for plain fp32 ZeRO-0 it does not, so we take it
    from the gradients first.
    """
    norm = None
    if policy.zero_optimization_stage() == 0 and not policy.bfloat16_enabled():
        grads = [p.grad.detach().float().norm() for p in policy.module.parameters() if p.grad is not None]
        norm = float(torch.stack(grads).norm()) if grads else 0.0
    policy.step()
    reported = policy.get_global_grad_norm()
    return float(reported) if reported is not None else norm
