"""Trajectories -> training batches -> per-token log-probs: the trainer's side of the log-prob formula.

`token_logprobs` is the one formula; the hf engine imports it from here, and the vllm engine is set up
to report the same quantity (processed log-probs: after temperature and the placeholder ban).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .render import concat_image_inputs, model_inputs


LOGPROB_CHUNK = 128  # positions per chunk: the fp32 copies of the logits exist for this many positions at a time


def _chunk_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, banned: torch.Tensor | None):
    logits = logits.float() / temperature
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, banned: list[int],
                   chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """log softmax(logits / T) at `tokens` ([B, T, V], [B, T] -> [B, T]), with never-sampled tokens (image
    placeholders) removed from the distribution.

    Computed `chunk` positions at a time, so the fp32 upcast and the log-softmax of the full vocabulary never
    exist for a whole micro-batch (at B=8, T=541, V=152k that is 2.6 GB each); with gradients, each chunk is
    recomputed in the backward instead of kept. Each position's value is the same arithmetic as unchunked.
    """
    from torch.utils.checkpoint import checkpoint

    banned_t = torch.tensor(banned, device=logits.device) if banned else None
    grad = torch.is_grad_enabled() and logits.requires_grad
    out = []
    for s in range(0, logits.shape[1], chunk):
        args = (logits[:, s:s + chunk], tokens[:, s:s + chunk], temperature, banned_t)
        out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    return torch.cat(out, dim=1) if out else logits.new_zeros(tokens.shape, dtype=torch.float32)


@dataclass
class Batch:
    """Right-padded sequences with their images, ready for one forward."""

    inputs: dict  # the model's keyword inputs (render.model_inputs)
    loss_mask: torch.Tensor  # [B, T] 1 where the token at t is trained
    engine_logp: torch.Tensor  # [B, T] the rollout engine's log-probs of generated tokens, 0 elsewhere

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


def make_batch(seqs, processor, dev: torch.device) -> Batch:
    """seqs: objects with token_ids, loss_mask, engine_logp, tensors (see rollout.Trajectory)."""
    T = max(len(s.token_ids) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), processor.tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    elp = torch.zeros((B, T))
    for i, s in enumerate(seqs):
        n = len(s.token_ids)
        ids[i, :n] = torch.tensor(s.token_ids)
        att[i, :n] = 1
        mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.float)
        elp[i, :n] = torch.tensor(s.engine_logp, dtype=torch.float)
    images = concat_image_inputs(s.tensors for s in seqs)
    return Batch(model_inputs(processor, ids, att, images, dev), mask.to(dev), elp.to(dev))


def _logits(model, batch: Batch) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.inputs.items()}
    return model(**inputs, use_cache=False).logits


def sequence_logprobs(model, batch: Batch, temperature: float, banned: list[int]) -> torch.Tensor:
    """[B, T] log-prob of token t given tokens < t (0 at t = 0), the same formula as the engines use."""
    logits = _logits(model, batch)
    lp = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature, banned)  # chunked, no full fp32 copy
    # prompt positions holding image placeholders have log-prob -inf (never sampleable); they are never
    # trained, and a finite 0 there keeps `logp * mask` free of inf * 0 = nan
    lp = lp.masked_fill(torch.isinf(lp), 0.0)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def target_logprobs(model, batch: Batch, targets: torch.Tensor, temperature: float, banned: list[int]) -> torch.Tensor:
    """[B, T] log-prob of targets[:, t] given tokens <= t: Tinker's alignment (position t predicts target t),
    the same formula otherwise. A banned target (a placeholder) gets 0, as in `sequence_logprobs`."""
    lp = token_logprobs(_logits(model, batch), targets, temperature, banned)
    return lp.masked_fill(torch.isinf(lp), 0.0)
