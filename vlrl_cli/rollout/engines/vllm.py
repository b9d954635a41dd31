"""The `vllm` rollout engine: an in-process vLLM engine on this rank's GPU, colocated with the trainer.

Facts this relies on (measured with vLLM 0.26, see shared/device/README.md):
* in-process engine core only with VLLM_ENABLE_V1_MULTIPROCESSING=0 (set here before vLLM loads);
* `apply_model(fn)` gives the model; `load_weights(iter of (HF name, tensor))` updates it in place;
* after a weight load, the prefix cache, the multimodal cache AND the vision-encoder cache must all be
  cleared, or an image seen before the update keeps encoder outputs of the old weights.
Prompts go in as token ids with one placeholder per image (vLLM expands it with its own processor
from the same canonical images); the expanded ids vLLM reports are checked against the trainer's.
Log-probs: `processed_logprobs` (after temperature and the placeholder ban, as the trainer computes).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ...model.families import Family, family_of, family_of_processor, image_wrap_ids, vision_input_module
from . import (EngineLimits, GenRequest, Generation, Sampling, collapse_placeholders, new_token_cap,
               placeholder_token_ids)


class PromptMismatch(RuntimeError):
    pass


def engine_args(model_path: str, dtype: str, gpu_memory_utilization: float, seed: int, limits: EngineLimits | None,
                in_trainer: bool, family: Family | None = None, processor=None) -> dict:
    """vllm.LLM's arguments: the limits it fixes at start-up come from the recipe (EngineLimits), so a recipe's
    longest episode and its images always fit; in_trainer: one engine per rank, in the trainer's process group;
    family: the model's declaration, for what vLLM must be told about its config; processor: the one the
    trainer renders with, whose image budget vLLM must share."""
    limits = limits or EngineLimits()
    kwargs = dict(model=model_path, dtype="bfloat16" if dtype == "bfloat16" else dtype,
                  gpu_memory_utilization=gpu_memory_utilization, seed=seed, max_model_len=limits.max_model_len,
                  enable_sleep_mode=True, logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                  limit_mm_per_prompt={"image": max(limits.max_images, 1), "video": 0})
    if family is not None and family.flat_config:
        kwargs["hf_overrides"] = flat_text_config
    budget = getattr(getattr(processor, "image_processor", None), family.image_budget, None) \
        if family is not None and family.image_budget else None
    if budget is not None:  # as many placeholders as the trainer's processor gives each image
        kwargs["mm_processor_kwargs"] = {family.image_budget: budget}
    if importlib.util.find_spec("flashinfer") is None:
        # hybrid models (Qwen3.5's gated DeltaNet): on Hopper vLLM's "auto" picks FlashInfer's prefill kernel and
        # fails at the first prefill where it is not installed; its Triton kernel needs nothing more
        kwargs["gdn_prefill_backend"] = "triton"
    if in_trainer:  # inside a (DeepSpeed) trainer: one engine per rank, reusing the process group it made
        kwargs.update(tensor_parallel_size=1, distributed_executor_backend="external_launcher")
    return kwargs


def flat_text_config(config):
    """The model's config as vLLM 0.26 reads it (passed as its hf_overrides). transformers >= 5.17 keeps an
    attribute that differs between layers per layer and refuses a global read of it (Gemma 4's head_dim: 256 on
    sliding layers, 512 on full ones), while vLLM reads one head_dim and the family's flat key for the odd
    layers (global_head_dim). Give vLLM that form: the global value readable, the other under the flat key."""
    text = config.get_text_config()
    if not getattr(text, "is_heterogeneous", False):
        return config
    text.allow_global_per_layer_attribute_access = True
    for attr, flat_key in family_of(config).flat_config.items():
        others = {getattr(layer, attr) for layer in text.per_layer_config} - {getattr(text, attr)}
        if len(others) > 1:
            raise ValueError(f"{attr} takes {len(others) + 1} values across layers; vLLM's {flat_key} holds one")
        if others:
            setattr(text, flat_key, others.pop())
    return config


class VLLMEngine:
    def __init__(self, model_path: str, processor, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 seed: int = 0, limits: EngineLimits | None = None, external_launcher: bool = False, **_):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # FlashInfer's sampler returns no processed log-probs (and is not always installed)
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        # hybrid models' Triton kernels (Qwen3.5's gated DeltaNet) autotune at every engine start, about two
        # minutes on an H100; kept in Triton's on-disk cache, the next run on the machine skips it
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        import torch.distributed as dist
        from vllm import LLM

        kwargs = engine_args(model_path, dtype, gpu_memory_utilization, seed, limits,
                             dist.is_initialized() or external_launcher, family_of_processor(processor), processor)
        if dist.is_initialized():
            # the external launcher reads the rank from the environment, which a process group made without a
            # launcher (an earlier engine's, in one process: check-drift, serve, tests) does not set
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() % max(torch.cuda.device_count(), 1)))
        self.llm = LLM(**kwargs)
        self.processor = processor
        self.pad_id = processor.image_token_id
        self.wrap = image_wrap_ids(processor)
        self.banned = placeholder_token_ids(processor)
        self.asleep = False  # KV cache released
        self.weights_asleep = False
        self.weights_discarded = False  # level-2 sleep until the next update_weights
        self.last_prompt_ids: list[list[int]] = []  # vLLM's expanded prompt ids of the last generate
        self.strict_prompts = True  # raise PromptMismatch; check-drift turns it off and reports instead

    def generate(self, requests: list[GenRequest], sampling: Sampling) -> list[list[Generation]]:
        from vllm import SamplingParams

        from ...model.render import split_messages

        self.wake()  # generating on a sleeping engine (no KV cache) would hang
        greedy = sampling.temperature == 0
        prompts, params = [], []
        for i, r in enumerate(requests):
            images = r.images if r.images is not None else split_messages(r.messages or [])[1]
            prompt = {"prompt_token_ids": collapse_placeholders(r.input_ids, self.pad_id, self.wrap)}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
            params.append(SamplingParams(
                n=r.n, temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
                top_k=0 if greedy else sampling.top_k,
                max_tokens=new_token_cap(r, sampling), logprobs=0, seed=sampling.seed + i,
                ignore_eos=sampling.ignore_eos, detokenize=False,  # the rollout decodes what it needs itself
                logit_bias={t: -1e4 for t in self.banned}))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.last_prompt_ids = [list(o.prompt_token_ids) for o in outputs]
        result = []
        for req, out in zip(requests, outputs):
            if self.strict_prompts and list(out.prompt_token_ids) != list(req.input_ids):
                raise PromptMismatch(f"vLLM expanded the prompt to {len(out.prompt_token_ids)} ids, the trainer has "
                                     f"{len(req.input_ids)}: placeholder expansion differs")
            gens = []
            for c in out.outputs:
                lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]  # logprobs=0: the sampled token's
                gens.append(Generation(list(c.token_ids), lps, "stop" if c.finish_reason == "stop" else "length"))
            result.append(gens)
        return result

    def attach_vision_probe(self, probe) -> None:
        """Record what vLLM's vision encoder receives (see engines.VisionInputProbe); in-process engine only."""
        # vLLM's models name their tower (and its first submodule) as transformers does
        family = family_of(self.llm.llm_engine.model_config.hf_config)
        self.llm.apply_model(lambda model: vision_input_module(getattr(model, family.vision_tower), family)
                             .register_forward_pre_hook(probe, with_kwargs=True) and None)

    def update_weights(self, named_tensors) -> None:
        """Load (HF name, tensor) pairs and drop every cache that could serve old-weight results."""
        batch = [(n, t) for n, t in named_tensors]
        if self.weights_asleep:  # the weights must be back on the GPU before they are overwritten; the
            # trainer's cached blocks go back first (right after training they are most of the GPU)
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
            self.weights_asleep = False
        self.llm.apply_model(lambda model: model.load_weights(iter(batch)))
        self.weights_discarded = False  # a sync pushes every weight; generate runs only after it ends
        self.reset_caches()

    def reset_caches(self) -> None:
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()  # not on LLM in 0.26; see the stale vision cache fact

    def sleep(self, discard_weights: bool = False) -> None:
        """Level 1 copies the weights to host memory and back; level 2 drops them (vLLM saves and restores
        the model's buffers itself), for a caller that reloads every weight before the next generate."""
        if not self.asleep:
            self.llm.sleep(level=2 if discard_weights else 1)
            self.asleep = self.weights_asleep = True
            self.weights_discarded = discard_weights

    def wake(self) -> None:
        if self.weights_discarded:
            raise RuntimeError("the vllm engine slept at level 2 (weights discarded) and no weight sync followed: "
                               "it would generate from uninitialised memory")
        if self.asleep:
            # the trainer's cached free blocks go back first, or vLLM cannot map its weights and KV cache
            # next to them (a 3B model under ZeRO-2 on one H200 ran out of memory here)
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=None if self.weights_asleep else ["kv_cache"])
            self.asleep = self.weights_asleep = False
