"""`vlrl train RECIPE --plan`: the GPU memory a recipe needs, phase by phase, before any GPU work.

The model's shape comes from its config alone (a model built on the meta device: no weights are read).
Two phases matter on a GPU shared by the trainer and a colocated rollout engine:

- generate: the trainer's resident state (weights, fp32 master weights, Adam moments) stays on the GPU
  while the engine holds its pool (vLLM: rollout.gpu_memory_utilization of the card, weights + KV cache);
- train: the engine sleeps (vLLM gives its memory back), and the trainer adds gradients, activations,
  logits and the optimizer step's transient fp32 gradient copy (policy.param_groups bounds it).

Checked on an H100 (bench/results/gpu.json, `fit`): 3B full fine-tune, ZeRO-2, micro-batch 8 of 541 tokens:
planned 74.8 GB train (ZeRO-1: 71.6), 52.6 GB held while generating; measured 72.1 GB trainer peak
(ZeRO-1: 68.9), 53.9 GB held; 3B LoRA rank 64, ZeRO-2: planned 16.7 GB, measured 16.8 GB; 7B LoRA: planned
26.9 GB, measured 26.7 GB. The plan errs on the side of refusing less than 3 GB too early.

Figures are per GPU. Weights, gradients and optimizer state are exact byte counts for DeepSpeed ZeRO 0-3
with bf16/fp32 as vlrl configures it; activations and logits are estimates for the longest micro-batch the
recipe allows (data.max_prompt_tokens + the generated tokens), with sdpa attention (no score matrices) and
the language model only (the vision tower's activations are small next to it with checkpointing). Measured
against this plan: README, Performance.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from ..model.families import known_config
from .recipe import episode_tokens

GB = 1e9
# the GPUs a recipe may say it is sized for (trainer.sized_for), memory as the card reports it
GPUS = {"H100-80GB": 79.6, "H200-141GB": 143.8, "A100-80GB": 79.3, "A100-40GB": 39.4, "L40S-48GB": 47.7,
        "RTX4090-24GB": 24.0, "B200-180GB": 182.0}
CONTEXT_GB = 1.5  # CUDA context, NCCL and vLLM's CUDA graphs: outside PyTorch's allocator, never usable
STEP_GROUP = 100_000_000  # policy.param_groups' group size: the optimizer step's fp32 gradient copy
ENGINE_WORK_GB = 1.0  # vLLM's own activations (its start-up profile) beside its weights and KV cache
MAX_GPUS = 1024


@dataclass
class ModelShape:
    params: int  # unique parameters (tied embeddings once)
    trainable: int  # what the optimizer holds: all, or the LoRA adapters
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_bytes_per_token: int = 0  # the engine's KV cache for one token, all layers (bf16)


@dataclass
class MemoryPlan:
    model: str
    gpu: str
    gpu_gb: float
    gpus: int
    shape: ModelShape
    tokens_per_micro_batch: int
    resident: dict[str, float] = field(default_factory=dict)  # GB per GPU, held in both phases
    training: dict[str, float] = field(default_factory=dict)  # GB per GPU, the training phase only
    engine_gb: float = 0.0  # the rollout engine while it generates (on the trainer's card: colocated)
    engine_ranks: int = 0  # GPUs that only generate (rollout.engine_ranks); the others only train
    engine_card_gb: float = 0.0  # what an engine rank's card holds
    engine_needs_gb: float = 0.0  # the least a vLLM pool must hold: weights, one longest episode's KV cache
    generate_peak_gb: float = 0.0
    train_peak_gb: float = 0.0
    usable_gb: float = 0.0
    fits: bool = True
    advice: list[str] = field(default_factory=list)
    faster: list[str] = field(default_factory=list)  # changes that train faster and still fit

    def to_json(self) -> dict:
        return asdict(self)


def model_config(path: str):
    """The model's config: a local folder, a released size vlrl knows (offline), the local Hugging Face
    cache, or the hub (the config file only)."""
    from pathlib import Path

    from transformers import AutoConfig

    from ..model.families import family_of
    from ..model.loading import check_model_name, hub_usable

    folder = Path(path).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():  # its config is all the plan reads
        source, where, kwargs = str(folder), str(folder / "config.json"), {}
    else:
        known = known_config(path)
        if known is not None:
            return known
        # a missing folder, a file, an unreachable hub: one line in seconds, as a run's start says it
        source = where = check_model_name(path)
        kwargs = {} if Path(source).exists() or hub_usable() else {"local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - not JSON, no model_type, a private repo: one message for all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"--plan: cannot read the config of {where} ({type(e).__name__}: {first})") from None
    try:
        family_of(config)  # an architecture vlrl does not train: refused as a run's start refuses it
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return config


def _kv_bytes_per_token(text, width: int = 2) -> int:
    """K and V of one token in every layer that caches them (the widest head where layers differ: Gemma 4's
    full layers). Linear-attention layers (Qwen3.5's gated DeltaNet) keep a fixed-size state instead, and layers
    that reuse an earlier layer's keys and values (Gemma 4's last layers) hold none: read from the config's
    `layer_types` and `num_kv_shared_layers`. Sliding-window layers are counted in full (an upper bound)."""
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if getattr(text, "is_heterogeneous", False) and "head_dim" in text.per_layer_attributes:
        head_dim = max(layer.head_dim for layer in text.per_layer_config)
    else:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    types = list(getattr(text, "layer_types", None) or []) or ["full_attention"] * text.num_hidden_layers
    layers = sum(1 for t in types if t != "linear_attention") - (getattr(text, "num_kv_shared_layers", 0) or 0)
    return 2 * max(layers, 1) * kv_heads * head_dim * width


def model_shape(config, lora=None) -> ModelShape:
    """Parameter counts from a model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    trainable = params
    if lora is not None and lora.rank > 0:
        from .lora import target_regex

        pattern = re.compile(target_regex(lora.target_modules, lora.vision, config))
        trainable = sum(_lora_params(m, lora.rank) for name, m in model.named_modules() if pattern.fullmatch(name))
    text = config.get_text_config()
    return ModelShape(params, trainable, text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                      text.vocab_size, _kv_bytes_per_token(text))


def _lora_params(module, rank: int) -> int:
    """Adapter parameters PEFT adds to one layer: A [r, in] and B [out, r]; a convolution's A spans its kernel."""
    import math

    import torch

    if isinstance(module, torch.nn.Linear):
        return rank * (module.in_features + module.out_features)
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return rank * (module.in_channels * math.prod(module.kernel_size) + module.out_channels)
    return 0


def plan_memory(recipe, gpu: str | None = None, gpu_gb: float | None = None, gpus: int = 1,
                shape: ModelShape | None = None, advise: bool = True) -> MemoryPlan:
    """The per-GPU memory of `recipe` on `gpus` GPUs of `gpu_gb` GB each (see the module docstring).
    advise: when it does not fit, look for single changes that do (the advice's own plans look no further)."""
    m, r, tr = recipe.model, recipe.rollout, recipe.trainer
    if gpu_gb is None:
        gpu = gpu or tr.sized_for
        if gpu not in GPUS:
            raise UserError(f"--plan: unknown GPU {gpu!r}; one of {', '.join(GPUS)} (or run it on the GPU itself)")
        gpu_gb = GPUS[gpu]
    shape = shape or model_shape(model_config(m.path), m.lora)
    w = 2 if m.dtype == "bfloat16" else 4
    split = r.engine_ranks > 0
    if split:  # the last engine_ranks GPUs only generate: ZeRO shards over the trainer GPUs alone
        from .rollout_ranks import check_placement

        check_placement(r.engine_ranks, gpus)
    stage, world, P, T = tr.zero_stage, gpus - r.engine_ranks, shape.params, shape.trainable
    mixed = m.dtype == "bfloat16"  # DeepSpeed keeps fp32 master weights for bf16 training
    shard = lambda n, from_stage: n / world if stage >= from_stage else n  # noqa: E731
    on_gpu_optimizer = not (tr.offload and stage > 0)

    resident = {"weights": shard(P * w, 3) / GB}
    if on_gpu_optimizer:
        resident["fp32 master weights"] = shard(T * 4, 1) / GB if mixed else 0.0
        resident["Adam moments (fp32)"] = shard(T * 8, 1) / GB
    if tr.grad_accum_fp32:  # BF16_Optimizer's fp32 gradient buffers: whole on every rank, allocated at start
        resident["fp32 gradient accumulation"] = T * 4 / GB
    resident = {k: v for k, v in resident.items() if v}

    seq = episode_tokens(recipe)
    if recipe.algorithm.name == "sft":
        seq = recipe.data.max_prompt_tokens
    N = tr.micro_batch * seq
    h, L, I, V = shape.hidden, shape.layers, shape.intermediate, shape.vocab
    per_layer = N * w * (8 * h + 3 * I)  # one layer's saved activations (sdpa, SwiGLU MLP)
    activations = L * N * h * w + per_layer if m.gradient_checkpointing else L * per_layer
    training = {
        # ZeRO 1/2: the bf16 .grad tensors and DeepSpeed's contiguous partition buffer both exist at the peak
        # (measured: 3B full fine-tune on one H100, trainer peak 72.1 GB = held 53.9 + 2 x 7.5 + 3.2)
        # (with grad_accum_fp32 the bf16 .grad of a micro-batch is folded into the fp32 buffer and freed)
        "gradients": (T * w if tr.grad_accum_fp32 else T * w * (1 + 1 / world) if stage in (1, 2) else shard(T * w, 3)) / GB
                     + (T * 4 / GB if stage == 0 and mixed else 0.0),
        "activations (estimate)": activations / GB,
        "logits": (N * V * w + 2 * tr.micro_batch * 128 * V * 4) / GB,  # full-width logits + fp32 chunks
    }
    if on_gpu_optimizer and stage in (1, 2) and not tr.grad_accum_fp32:
        training["optimizer step (fp32 grad copy)"] = min(shard(T, 1), STEP_GROUP) * 4 / GB
    if stage == 2:  # its contiguous-gradient reduce buckets (measured: ZeRO-2 peaks 3.2 GB above ZeRO-1)
        training["ZeRO-2 reduce buckets"] = 3.2
    engine_alone_gb = r.gpu_memory_utilization * gpu_gb if r.engine == "vllm" else P * w / GB
    if r.engine == "hf" and not split:  # the hf engine's model copy stays on the GPU
        resident["hf engine (model copy)"] = P * w / GB
    engine_gb = r.gpu_memory_utilization * gpu_gb if r.engine == "vllm" and not split else 0.0
    if recipe.algorithm.kl_coef > 0 and m.lora.rank == 0:  # LoRA's reference is its base: adapters switched off
        resident["KL reference model"] = P * w / GB

    plan = MemoryPlan(m.path, gpu or "this GPU", gpu_gb, gpus, shape, N, resident, training, engine_gb,
                      r.engine_ranks, engine_alone_gb if split else 0.0)
    base = sum(resident.values())
    plan.generate_peak_gb = base + engine_gb
    plan.train_peak_gb = base + sum(training.values())
    plan.usable_gb = gpu_gb - CONTEXT_GB
    plan.fits = max(plan.generate_peak_gb, plan.train_peak_gb, plan.engine_card_gb) <= plan.usable_gb
    if r.engine == "vllm":  # a pool that cannot hold the weights and one episode fails at the engine's start
        plan.engine_needs_gb = P * 2 / GB + shape.kv_bytes_per_token * episode_tokens(recipe) / GB + ENGINE_WORK_GB
        plan.fits = plan.fits and engine_alone_gb >= plan.engine_needs_gb
    if not plan.fits and advise:
        plan.advice = _advice(recipe, plan, gpu, shape)
    if plan.fits and advise:
        plan.faster = _faster(recipe, plan, gpu, shape)
    return plan


def _faster(recipe, now: MemoryPlan, gpu: str | None, shape) -> list[str]:
    """Changes that spend the room a fitting plan leaves on speed: no recompute (a quarter less compute), and
    twice the micro-batch (fewer, longer kernels where a small model leaves the GPU waiting on the host).
    Measured on one H100, Qwen3-VL-2B micro-batches of 8 x 481 tokens: +56% tokens/s without recompute, +40% at
    micro-batch 16 (bench/results/gpu_runs/families_2026_12_07)."""
    tr, r = recipe.trainer, recipe.rollout
    sequences = r.prompts_per_step * (r.n if recipe.algorithm.name == "grpo" else 1)
    per_rank = sequences / max(1, now.gpus - r.engine_ranks)
    tries = []
    if recipe.model.gradient_checkpointing:
        tries.append(["model.gradient_checkpointing=false"])
    if 2 * tr.micro_batch <= per_rank:  # a micro-batch holds at most the sequences a rank trains on per step
        tries.append([f"trainer.micro_batch={2 * tr.micro_batch}"])
    if len(tries) == 2:
        tries.append(tries[0] + tries[1])
    return [f"{change}  (train peak {p.train_peak_gb:.1f} GB)"
            for change, p in _fitting(recipe, tries, gpu, now, shape)]


def _fitting(recipe, tries: list[list[str]], gpu: str | None, now: MemoryPlan, shape):
    """(the --set flags, its plan) for each change in `tries` whose plan fits (the plans look no further)."""
    from .recipe import with_overrides

    for sets in tries:
        variant = with_overrides(recipe, sets)
        lora_changed = variant.model.lora.rank != recipe.model.lora.rank
        s = model_shape(model_config(variant.model.path), variant.model.lora) if lora_changed else shape
        p = plan_memory(variant, gpu, now.gpu_gb, now.gpus, s, advise=False)
        if p.fits:
            yield f"--set {' --set '.join(sets)}", p


def _advice(recipe, now: MemoryPlan, gpu: str | None, shape) -> list[str]:
    """Single changes to the recipe that make `now` (its plan, which does not fit) fit, tried one at a time."""
    gpu_gb, gpus = now.gpu_gb, now.gpus

    tries = []
    if recipe.trainer.zero_stage > 0 and not recipe.trainer.offload:
        tries.append(["trainer.offload=true"])
    if recipe.model.lora.rank == 0:
        tries.append(["model.lora.rank=64"])
    if recipe.trainer.zero_stage == 2 and gpus == 1:
        tries.append(["trainer.zero_stage=1"])
    if recipe.trainer.micro_batch > 1:
        tries += [[f"trainer.micro_batch={max(1, recipe.trainer.micro_batch // k)}"] for k in (2, 4, 8)]
    if recipe.rollout.engine == "vllm":
        tries += [[f"rollout.gpu_memory_utilization={u}"] for u in (0.3, 0.2, 0.15)
                  if u < recipe.rollout.gpu_memory_utilization]
    if not recipe.model.gradient_checkpointing:
        tries.append(["model.gradient_checkpointing=true"])
    if now.engine_needs_gb > (now.engine_gb or now.engine_card_gb):
        # the pool cannot hold the model: every change needs the least pool that can, alone or with it
        pool = f"rollout.gpu_memory_utilization={math.ceil(now.engine_needs_gb / gpu_gb * 20) / 20:.2f}"
        tries = [[pool]] + [t + [pool] for t in tries if "gpu_memory_utilization" not in t[0]]
    return [f"{change}  (peak {max(p.generate_peak_gb, p.train_peak_gb):.1f} GB)"
            for change, p in _fitting(recipe, tries, gpu, now, shape)]


def render_plan(plan: MemoryPlan) -> str:
    """The plan as a plain-text table (the CLI prints it; the start-up refusal quotes it)."""
    s = plan.shape
    lines = [f"memory plan: {plan.model} on {plan.gpus} x {plan.gpu} ({plan.gpu_gb:.0f} GB each, "
             f"{plan.usable_gb:.1f} usable)",
             f"  parameters {s.params / 1e9:.2f} B, trained {s.trainable / 1e9:.3f} B; "
             f"longest micro-batch {plan.tokens_per_micro_batch:,} tokens",
             f"  {'held in both phases':<36}{'GB':>8}"]
    lines += [f"    {k:<34}{v:>8.1f}" for k, v in plan.resident.items()]
    lines.append(f"  {'training phase adds':<36}")
    lines += [f"    {k:<34}{v:>8.1f}" for k, v in plan.training.items()]
    if plan.engine_gb:
        lines.append(f"  {'generate phase adds: vLLM pool':<36}{plan.engine_gb:>8.1f}")
    pool = plan.engine_gb or plan.engine_card_gb
    if plan.engine_needs_gb and pool < plan.engine_needs_gb:
        lines.append(f"  the vLLM pool ({pool:.1f} GB) cannot hold the model's weights and one longest episode's "
                     f"KV cache ({plan.engine_needs_gb:.1f} GB): raise rollout.gpu_memory_utilization")
    if plan.engine_ranks:
        trainers = plan.gpus - plan.engine_ranks
        lines[0] += f"; {trainers} train, {plan.engine_ranks} only generate"
        lines.append(f"  {'engine GPUs hold (the rest: free)':<36}{plan.engine_card_gb:>8.1f}")
        if plan.engine_card_gb < 0.5 * plan.usable_gb:
            lines.append("  (an engine GPU is its own: rollout.gpu_memory_utilization up to 0.9 gives vLLM's KV cache "
                         "the rest of it)")
    lines.append(f"  peak: generate {plan.generate_peak_gb:.1f} GB, train {plan.train_peak_gb:.1f} GB -> "
                 + ("fits" if plan.fits else f"DOES NOT FIT in {plan.usable_gb:.1f} GB"))
    if plan.faster:
        lines.append("  room to train faster: " + "; ".join(plan.faster))
    if not plan.fits:
        lines.append("  changes that fit: " + ("; ".join(plan.advice) if plan.advice else
                                                 "none of offload, LoRA, a smaller micro-batch or vLLM pool alone; "
                                                 "use more GPUs with zero_stage 3"))
    return "\n".join(lines)


def parse_sized_for(text: str) -> tuple[int, str]:
    """'8xH100-80GB' -> (8, 'H100-80GB'); 'H100-80GB' -> (1, 'H100-80GB')."""
    count, sep, name = text.partition("x") if text[:1].isdigit() else ("1", "", text)
    if not count.isdigit() or not 1 <= int(count) <= MAX_GPUS:
        raise UserError(f"{text!r}: the GPU count must be 1..{MAX_GPUS} (e.g. 8xH100-80GB)")
    return int(count), name


def plan_for(recipe, gpu: str | None = None, gpus: int | None = None) -> MemoryPlan:
    """The plan on `gpu` (a name in GPUS), else on this machine's GPU, else on the recipe's trainer.sized_for.

    gpus: ranks (GPUs) the run uses; default: the count sized_for names, or 1."""
    if gpu is not None:
        count, name = parse_sized_for(gpu)
        if name not in GPUS:
            raise UserError(f"--gpu {gpu!r}: unknown GPU; one of {', '.join(GPUS)} (optionally 8x...)")
        return plan_memory(recipe, name, GPUS[name], gpus or count)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return plan_memory(recipe, props.name, props.total_memory / GB, gpus or 1)
    if recipe.trainer.sized_for == "cpu":
        raise UserError("--plan: this recipe is sized for the CPU (trainer.sized_for: cpu); "
                        "pass --gpu H100-80GB to plan it for a GPU")
    count, name = parse_sized_for(recipe.trainer.sized_for)
    return plan_memory(recipe, name, GPUS[name], gpus or count)
