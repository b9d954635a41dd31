"""Sequences -> micro-batches -> per-token log-probs.

The one place that builds a model's inputs for a batch (`make_batch`: right-padded, or packed end to end) and
the one function that scores it (`sequence_logprobs`), for every model that scores: the policy, the KL
reference, check-drift's trainer and `vlrl serve`. The log-prob formula itself is model/logprobs.py, which the
hf engine shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.families import family_of
from ..model.logprobs import token_logprobs
from ..model.render import concat_image_inputs, model_inputs
from ..rollout.episodes import Sequence


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


def micro_batches(lengths: list[int], per_batch: int = 0, pack_tokens: int = 0, padded_tokens: int = 0) -> list[range]:
    """Consecutive sequences per forward, by one of three budgets: `pack_tokens` > 0, as many as fit end to end
    in that many tokens (a packed row); else `padded_tokens` > 0, as many as fit padded (count x longest);
    else `per_batch` at a time. A sequence over a token budget goes alone."""
    if pack_tokens <= 0 and padded_tokens <= 0:
        step = max(per_batch, 1)
        return [range(i, min(i + step, len(lengths))) for i in range(0, len(lengths), step)]
    groups, start, total, longest = [], 0, 0, 0
    for i, n in enumerate(lengths):
        size = total + n if pack_tokens > 0 else max(longest, n) * (i - start + 1)
        if i > start and size > (pack_tokens if pack_tokens > 0 else padded_tokens):
            groups.append(range(start, i))
            start, total, longest = i, 0, 0
        total, longest = total + n, max(longest, n)
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups


def make_batch(seqs: list[Sequence], processor, dev: torch.device, packed_for=None) -> Batch:
    """The model inputs of these sequences, right-padded, or (packed_for: the model, or its DeepSpeed / PEFT
    wrapper, whose `get_rope_index` computes M-RoPE positions) packed end to end in one row with no padding.

    A packed row carries its sequence boundaries in its positions: each sequence keeps its own (M-RoPE
    computed per sequence, text positions restarting at 0) and there is no attention mask, from which
    transformers builds a block-diagonal causal mask for any attention implementation. So every model that
    scores the batch (policy, KL reference, check-drift) attends within sequences only; the GPU's varlen kernel
    needs no mask at all (`_logits`). A family whose image tokens attend to each other both ways (Gemma 4)
    gets its masks built here instead, one per layer type (packed_masks).
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
        inputs = model_inputs(processor, ids, None, images, dev)
        inputs["position_ids"] = packed_positions(packed_for, processor, seqs).to(dev)
        config = _inner(packed_for).config
        if family_of(config).bidirectional_images:
            inputs["attention_mask"] = packed_masks(config, inputs["mm_token_type_ids"], [len(s.token_ids) for s in seqs])
        return Batch(inputs, mask.to(dev), elp.to(dev), [len(s.token_ids) for s in seqs])
    ids = torch.full((B, T), processor.tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s.token_ids)] = torch.tensor(s.token_ids)
        att[i, :len(s.token_ids)] = 1
    return Batch(model_inputs(processor, ids, att, images, dev), mask.to(dev), elp.to(dev))


def uses_varlen(model) -> bool:
    from ..model.attention import PACKED

    config = getattr(model, "module", model).config
    return getattr(getattr(config, "text_config", config), "_attn_implementation", None) == PACKED


def _inner(model):
    """The transformers model under DeepSpeed / PEFT wrappers (the one with the config)."""
    model = getattr(model, "module", model)
    return getattr(getattr(model, "base_model", None), "model", model) if hasattr(model, "peft_config") else model


def _rope_owner(model):
    """The submodule that computes M-RoPE positions (`get_rope_index`), under DeepSpeed / PEFT wrappers."""
    for m in getattr(model, "module", model).modules():
        if hasattr(m, "get_rope_index"):
            return m
    raise TypeError(f"{type(model).__name__} has no get_rope_index: packing needs an M-RoPE model")


def packed_positions(model, processor, seqs) -> torch.Tensor:
    """The packed row's positions, each sequence's own as if it were alone. M-RoPE families: [4, 1, sum of
    lengths], row 0 the text positions (restarting at 0 per sequence: how transformers finds the sequence
    boundaries), rows 1-3 the sequence's M-RoPE positions. 1-D families: [1, sum of lengths], restarting."""
    from ..model.render import mm_token_type_ids

    if family_of(_inner(model).config).positions == "1d":
        return torch.cat([torch.arange(len(s.token_ids)) for s in seqs]).view(1, -1)
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


def packed_masks(config, token_types: torch.Tensor, lengths: list[int]) -> dict[str, torch.Tensor]:
    """[1, 1, T, T] boolean masks (True: may attend) of a packed row, per layer type, for a model with sliding-
    window layers whose image tokens may attend to each other both ways (Gemma 4): full-attention layers are
    causal within each sequence; sliding layers causal within the window, or, where the config asks for it
    (use_bidirectional_attention "vision"), within one image's block (a run of image tokens, token_types 1),
    and never across sequences. What transformers builds for one sequence;
    built here because its packed-row inference does not handle the image blocks."""
    text = getattr(config, "text_config", config)
    types = token_types.reshape(-1).cpu()
    T = types.numel()
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    image = types == 1
    starts = image & torch.cat([torch.tensor([True]), ~image[:-1]])  # first token of each run of image tokens
    block = torch.where(image, torch.cumsum(starts, 0), torch.zeros_like(types))  # 0: not an image token
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    same = seq[:, None] == seq[None, :]
    causal = (k <= q) & same
    both_ways = (block[:, None] == block[None, :]) & (block[:, None] > 0)
    if getattr(text, "use_bidirectional_attention", None) != "vision":  # E2B/E4B: causal images, as transformers
        both_ways = torch.zeros_like(both_ways)                          # and vLLM run them
    window = causal & (q - k < text.sliding_window)
    masks = {"full_attention": causal, "sliding_attention": window | both_ways}
    return {name: masks[name][None, None].to(token_types.device) for name in set(text.layer_types)}


def _logits(model, batch: Batch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, V] logits, or [B, len(keep), V] at the positions `keep` only (the language-model head and
    its memory for those positions alone)."""
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in batch.inputs.items()}  # a packed row's per-layer-type masks (a dict) are boolean
    if batch.lengths is not None and batch.input_ids.is_cuda and uses_varlen(model):
        # the varlen kernel (model.attention.packed_text_attention) finds the boundaries in the positions
        # itself: an all-ones mask makes transformers skip building the [T, T] block mask it would ignore
        inputs["attention_mask"] = torch.ones_like(batch.input_ids)
    if keep is not None:
        inputs["logits_to_keep"] = keep
    return model(**inputs, use_cache=False).logits


def sequence_logprobs(model, batch: Batch, temperature: float, banned: list[int], only: torch.Tensor | None = None,
                      targets: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] log-prob of token t given tokens < t (0 at t = 0), the same formula as the engines use.

    only: a [B, T] mask (the loss mask): log-probs are computed only where it is nonzero and are 0
    elsewhere. The logits then exist only at the positions that predict those tokens (in any row of a
    padded batch): no head, no log-softmax and no memory for prompts, padding or other tokens.
    targets: [B, T] tokens to score instead, in Tinker's alignment (position t predicts targets[:, t], given
    tokens <= t; padded batches), for `vlrl serve`.
    Image placeholders have log-prob -inf (never sampleable) and are never trained; they get a finite 0, which
    keeps `logp * mask` free of inf * 0 = nan."""
    if targets is not None:
        lp = token_logprobs(_logits(model, batch), targets, temperature, banned)
        return lp.masked_fill(torch.isinf(lp), 0.0)
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
        out = out.index_put((rows, sources[cols] + 1), lp.masked_fill(torch.isinf(lp), 0.0))
    if batch.lengths is None:
        return out
    rows_out, start = [], 0  # packed: back to [B, T]
    for n in batch.lengths:
        rows_out.append(out[0, start:start + n])
        start += n
    return torch.nn.utils.rnn.pad_sequence(rows_out, batch_first=True)


@torch.no_grad()
def score_sequences(model, seqs: list[Sequence], processor, temperature: float, banned: list[int], dev,
                    per_batch: int = 8, padded_tokens: int = 0, pack_tokens: int = 0) -> list[np.ndarray]:
    """Log-probs [len(token_ids)] of each sequence under `model`, micro-batch by micro-batch (no gradients):
    what check-drift's trainer and serve's prompt log-probs compute, by the training code path (packed rows
    with `pack_tokens`, as trainer.pack_tokens trains)."""
    out = []
    groups = micro_batches([len(s.token_ids) for s in seqs], per_batch, pack_tokens, padded_tokens)
    for group in groups:
        chunk = [seqs[i] for i in group]
        batch = make_batch(chunk, processor, dev, packed_for=model if pack_tokens > 0 else None)
        lp = sequence_logprobs(model, batch, temperature, banned)
        out += [lp[j, :len(s.token_ids)].float().cpu().numpy() for j, s in enumerate(chunk)]
    return out
