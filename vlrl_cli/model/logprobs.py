"""The log-prob formula both sides use: log softmax(logits / T) at the sampled tokens, placeholders banned.

The trainer scores sequences with it (train/batches.py) and the hf engine reports the log-probs of what it
sampled with it (rollout/engines/hf.py); the vllm engine is set up to report the same quantity (processed
log-probs: after temperature and the placeholder ban).
"""

from __future__ import annotations

import torch


LOGPROB_CHUNK = 1024  # positions per chunk: the fp32 copies of the logits exist for this many positions at a time


def _chunk_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, banned: torch.Tensor | None):
    logits = logits.float() / temperature
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, banned: list[int],
                   chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """log softmax(logits / T) at `tokens` ([..., V], [...] -> [...]), with never-sampled tokens (image
    placeholders) removed from the distribution.

    Computed `chunk` positions at a time, so the fp32 upcast and the log-softmax of the full vocabulary never
    exist for a whole micro-batch (at 8 x 541 positions and V=152k that is 2.6 GB each); with gradients,
    each chunk is recomputed in the backward instead of kept. Each position's value is the same arithmetic
    as unchunked. The chunks are `split` views of the flattened positions: its backward writes each chunk's
    gradient into one tensor once. (Slicing instead made every chunk's backward a zero-filled gradient of
    the whole logits, summed chunk by chunk: measured on an H100, 2.5 s of a 9.3-s pass over 16k-token
    packed rows, and the reason packing was no faster than padding.)
    """
    from torch.utils.checkpoint import checkpoint

    shape = tokens.shape
    flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    banned_t = torch.tensor(banned, device=logits.device) if banned else None
    grad = torch.is_grad_enabled() and logits.requires_grad
    out = []
    for part, part_tokens in zip(flat.split(chunk), flat_tokens.split(chunk)):
        args = (part, part_tokens, temperature, banned_t)
        out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    return torch.cat(out).view(shape) if out else logits.new_zeros(shape, dtype=torch.float32)
