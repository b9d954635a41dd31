"""Trajectories -> training batches -> per-token log-probs: the trainer's side of the log-prob formula.

`token_logprobs` is the one formula; the hf engine imports it from here, and the vllm engine is set up
to report the same quantity (processed log-probs: after temperature and the placeholder ban).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .render import concat_image_inputs, model_inputs


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


@dataclass
class Batch:
    """Sequences with their images, ready for one forward: right-padded [B, T], or packed end to end in one
    row (`lengths` set; see make_batch). loss_mask and engine_logp are [B, T] either way."""

    inputs: dict  # the model's keyword inputs (render.model_inputs)
    loss_mask: torch.Tensor  # [B, T] 1 where the token at t is trained
    engine_logp: torch.Tensor  # [B, T] the rollout engine's log-probs of generated tokens, 0 elsewhere
    lengths: list[int] | None = None  # packed: each sequence's length, in row order

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def positions(self) -> tuple[int, int]:
        """(real tokens, positions the forward computes): their difference is padding."""
        real = int(self.loss_mask.new_tensor(self.lengths).sum()) if self.lengths is not None else \
            int(self.inputs["attention_mask"].sum())
        return real, self.input_ids.numel()


def micro_batches(lengths: list[int], per_batch: int, pack_tokens: int = 0) -> list[range]:
    """Consecutive sequences per forward: `per_batch` at a time, or (pack_tokens > 0) as many as fit in
    pack_tokens tokens end to end (a longer sequence goes alone)."""
    if pack_tokens <= 0:
        return [range(i, min(i + per_batch, len(lengths))) for i in range(0, len(lengths), per_batch)]
    groups, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > pack_tokens:
            groups.append(range(start, i))
            start, total = i, 0
        total += n
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups


def make_batch(seqs, processor, dev: torch.device, packed_for=None) -> Batch:
    """seqs: objects with token_ids, loss_mask, engine_logp, tensors (see rollout.Trajectory).

    packed_for: the model (or its DeepSpeed / PEFT wrapper) to pack for: the sequences go end to end in one
    row with no padding; each keeps its own positions (M-RoPE computed per sequence by the model's own
    `get_rope_index`, text positions restarting at 0), and transformers' Qwen-VL models turn those 4-row
    position ids into a block-diagonal causal mask, so no token attends across a sequence boundary.
    """
    T = max(len(s.token_ids) for s in seqs)
    B = len(seqs)
    mask = torch.zeros((B, T))
    elp = torch.zeros((B, T))
    for i, s in enumerate(seqs):
        n = len(s.token_ids)
        mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.float)
        elp[i, :n] = torch.tensor(s.engine_logp, dtype=torch.float)
    images = concat_image_inputs(s.tensors for s in seqs)
    if packed_for is not None:
        ids = torch.tensor([[t for s in seqs for t in s.token_ids]])
        # the sequence boundaries travel in position_ids; with no attention mask transformers builds the
        # block-diagonal one itself. The GPU's varlen path (modeling.packed_text_attention) needs no mask:
        # an all-ones one makes transformers skip building a [T, T] mask at all (is_causal)
        ones = torch.ones_like(ids) if uses_varlen(packed_for) and torch.device(dev).type == "cuda" else None
        inputs = model_inputs(processor, ids, ones, images, dev)
        inputs["position_ids"] = packed_positions(packed_for, processor, seqs).to(dev)
        return Batch(inputs, mask.to(dev), elp.to(dev), [len(s.token_ids) for s in seqs])
    ids = torch.full((B, T), processor.tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s.token_ids)] = torch.tensor(s.token_ids)
        att[i, :len(s.token_ids)] = 1
    return Batch(model_inputs(processor, ids, att, images, dev), mask.to(dev), elp.to(dev))


def uses_varlen(model) -> bool:
    from .modeling import PACKED

    config = getattr(model, "module", model).config
    return getattr(getattr(config, "text_config", config), "_attn_implementation", None) == PACKED


def _rope_owner(model):
    """The submodule that computes M-RoPE positions (`get_rope_index`), under DeepSpeed / PEFT wrappers."""
    for m in getattr(model, "module", model).modules():
        if hasattr(m, "get_rope_index"):
            return m
    raise TypeError(f"{type(model).__name__} has no get_rope_index: packing needs a Qwen-VL model")


def packed_positions(model, processor, seqs) -> torch.Tensor:
    """[4, 1, sum of lengths]: row 0 the text positions (restarting at 0 per sequence: how transformers finds
    the sequence boundaries), rows 1-3 each sequence's own M-RoPE positions, computed as for it alone."""
    from .render import mm_token_type_ids

    owner, rows = _rope_owner(model), []
    for s in seqs:
        ids = torch.tensor([s.token_ids])
        grid = s.tensors.get("image_grid_thw")
        if grid is not None and len(grid):
            pos, _ = owner.get_rope_index(ids, mm_token_type_ids=mm_token_type_ids(processor, ids),
                                          image_grid_thw=grid, attention_mask=torch.ones_like(ids))
        else:
            pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        rows.append(torch.cat([torch.arange(ids.shape[1]).view(1, 1, -1), pos.to(torch.long).cpu()], dim=0))
    return torch.cat(rows, dim=2)


def _logits(model, batch: Batch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, V] logits, or [B, len(keep), V] at the positions `keep` only (the language-model head and
    its memory for those positions alone)."""
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.inputs.items()}
    if keep is not None:
        inputs["logits_to_keep"] = keep
    return model(**inputs, use_cache=False).logits


def sequence_logprobs(model, batch: Batch, temperature: float, banned: list[int], only: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] log-prob of token t given tokens < t (0 at t = 0), the same formula as the engines use.

    only: a [B, T] mask (the loss mask): log-probs are computed only where it is nonzero and are 0
    elsewhere. The logits then exist only at the positions that predict those tokens (in any row of a
    padded batch): no head, no log-softmax and no memory for prompts, padding or other tokens."""
    B, T = batch.loss_mask.shape
    # target positions: every t >= 1 of every row (packed: a sequence's first position has no target)
    want = torch.ones((B, T), dtype=torch.bool, device=batch.loss_mask.device) if only is None else only > 0
    want[:, 0] = False
    if batch.lengths is not None:  # packed: [B, T] is the unpacked view; map it onto the one row
        row = torch.zeros((1, sum(batch.lengths)), dtype=torch.bool, device=want.device)
        start = 0
        for i, n in enumerate(batch.lengths):
            row[0, start + 1:start + n] = want[i, 1:n]
            start += n
        targets_at = row
    else:
        targets_at = want
    ids = batch.input_ids
    sources = targets_at[:, 1:].any(0).nonzero().flatten()  # positions whose logits predict a wanted token
    out = torch.zeros(targets_at.shape, dtype=torch.float32, device=ids.device)
    if len(sources):
        logits = _logits(model, batch, sources)  # [rows, S, V]
        rows, cols = targets_at[:, sources + 1].nonzero(as_tuple=True)
        flat = logits.reshape(-1, logits.shape[-1])
        picked = rows * len(sources) + cols
        sel = flat if len(picked) == flat.shape[0] else flat.index_select(0, picked)
        lp = token_logprobs(sel, ids[rows, sources[cols] + 1], temperature, banned)
        # image placeholders have log-prob -inf (never sampleable) and are never trained; a finite 0 keeps
        # `logp * mask` free of inf * 0 = nan
        out = out.index_put((rows, sources[cols] + 1), lp.masked_fill(torch.isinf(lp), 0.0))
    if batch.lengths is None:
        return out
    rows_out, start = [], 0  # packed: back to [B, T]
    for n in batch.lengths:
        rows_out.append(out[0, start:start + n])
        start += n
    return torch.nn.utils.rnn.pad_sequence(rows_out, batch_first=True)


def target_logprobs(model, batch: Batch, targets: torch.Tensor, temperature: float, banned: list[int]) -> torch.Tensor:
    """[B, T] log-prob of targets[:, t] given tokens <= t: Tinker's alignment (position t predicts target t),
    the same formula otherwise. A banned target (a placeholder) gets 0, as in `sequence_logprobs`."""
    lp = token_logprobs(_logits(model, batch), targets, temperature, banned)
    return lp.masked_fill(torch.isinf(lp), 0.0)
