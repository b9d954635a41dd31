"""The `hf` rollout engine: transformers' generate on its own copy of the weights.

Its own copy (not the trainer's module) because that is how the vLLM engine works too: after every
optimizer step the trainer pushes its weights in (`update_weights`), through the same gather path.
Log-probs are computed from the raw logits with the trainer's formula (model/logprobs.py: logits / T, placeholder tokens
masked), so with identical weights the two agree up to float rounding.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ...model.families import family_of, image_wrap_ids, vision_input_module, vision_tower
from ...model.logprobs import token_logprobs
from ...model.render import concat_image_inputs, image_inputs, image_token_counts, model_inputs, split_messages
from . import (GenRequest, Generation, Sampling, collapse_placeholders, expand_placeholders, new_token_cap,
               placeholder_token_ids)


class HFEngine:
    """own_preprocessing=True makes the engine process images itself, as vLLM does: its own image
    processor on the request's images, placeholders re-expanded to its own grid (check-drift uses this to
    test the agreement checks; training uses the trainer's tensors directly)."""

    def __init__(self, model_path: str, processor, dtype: str = "float32", device: str | None = None,
                 own_preprocessing: bool = False, attention: str = "auto", **_):
        from transformers import GenerationConfig

        from ...model.loading import load_vlm

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, dtype)
        self.model = load_vlm(model_path, self.dtype, attention).to(self.device).eval()
        self.processor = processor
        self.banned = placeholder_token_ids(processor)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else processor.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.pad = processor.tokenizer.pad_token_id
        # The model's own generation config (a repetition penalty, top-k, ...) would change what is sampled
        # while the log-probs below are the raw softmax's: the engine samples from exactly the distribution it
        # reports, with the request's settings alone. Only the end tokens are kept.
        self.model.generation_config = GenerationConfig(eos_token_id=sorted(self.eos), pad_token_id=self.pad,
                                                        bos_token_id=gen.bos_token_id)
        self.own_preprocessing = own_preprocessing
        self.last_prompt_ids: list[list[int]] = []  # the prompt ids generation started from, per request

    def attach_vision_probe(self, probe) -> None:
        """Record what the vision encoder receives (see engines.VisionInputProbe)."""
        tower = vision_tower(self.model)
        vision_input_module(tower, family_of(self.model.config)).register_forward_pre_hook(probe, with_kwargs=True)

    @torch.no_grad()
    def generate(self, requests: list[GenRequest], sampling: Sampling) -> list[list[Generation]]:
        """Requests whose prompts have the same length and sample count go through one batched `generate`
        (no padding, so each sequence's arithmetic is what it would be alone): a GRPO step's prompts of one
        shape are one call, not one each."""
        torch.manual_seed(sampling.seed)
        prompts = [self._inputs(r) for r in requests]
        self.last_prompt_ids = [list(ids) for ids, _ in prompts]
        out: list[list[Generation] | None] = [None] * len(requests)
        shapes: dict[tuple[int, int, int], list[int]] = {}  # one generate call per length, n and token cap
        for i, (ids, _) in enumerate(prompts):
            shapes.setdefault((len(ids), requests[i].n, new_token_cap(requests[i], sampling)), []).append(i)
        for (_, n, cap), idx in shapes.items():
            for k, gens in zip(idx, self._batch([prompts[i] for i in idx], n, replace(sampling, max_new_tokens=cap))):
                out[k] = gens
        return out

    def _inputs(self, req: GenRequest) -> tuple[list[int], dict]:
        if not self.own_preprocessing or not req.messages:
            return req.input_ids, req.tensors
        _, images = split_messages(req.messages)
        if not images:
            return req.input_ids, req.tensors
        tensors = image_inputs(self.processor.image_processor(images=images, return_tensors="pt"))
        pad = self.processor.image_token_id
        counts = image_token_counts(self.processor, tensors)
        wrap = image_wrap_ids(self.processor)
        return expand_placeholders(collapse_placeholders(req.input_ids, pad, wrap), pad, counts, wrap), tensors

    def _batch(self, prompts: list[tuple[list[int], dict]], n: int, s: Sampling) -> list[list[Generation]]:
        """n samples of each of these equal-length prompts, in one `generate` call."""
        ids = torch.tensor([p for p, _ in prompts])
        inputs = model_inputs(self.processor, ids, torch.ones_like(ids), concat_image_inputs(t for _, t in prompts),
                              self.device, self.dtype)
        greedy = s.temperature == 0
        out = self.model.generate(
            **inputs,
            do_sample=not greedy, temperature=None if greedy else s.temperature, top_p=None if greedy else s.top_p,
            top_k=None if greedy else s.top_k,  # 0 = off
            max_new_tokens=s.max_new_tokens, min_new_tokens=s.max_new_tokens if s.ignore_eos else None,
            num_return_sequences=n, suppress_tokens=self.banned, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]  # [len(prompts) * n, T], each prompt's n samples together
        logits = torch.stack(out.logits, dim=1).float()  # [., T, V] raw, before any processor
        logp = token_logprobs(logits, new, 1.0 if greedy else s.temperature, self.banned)
        gens = []
        for i in range(new.shape[0]):
            toks = new[i].tolist()
            end = None if s.ignore_eos else next((j + 1 for j, t in enumerate(toks) if t in self.eos), None)
            n_keep = end if end is not None else len(toks)
            gens.append(Generation(toks[:n_keep], logp[i, :n_keep].tolist(), "stop" if end else "length"))
        return [gens[k * n:(k + 1) * n] for k in range(len(prompts))]

    def update_weights(self, named_tensors) -> None:
        """Copy (name, tensor) pairs in, in place; names as in the HF state dict."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in named_tensors:
                params[name].copy_(t.to(params[name].device, params[name].dtype))

    def sleep(self, discard_weights: bool = False) -> None:  # nothing to free; the vllm engine frees its KV cache here
        pass

    def wake(self) -> None:
        pass

