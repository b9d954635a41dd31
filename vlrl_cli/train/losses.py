"""GRPO-family advantages and policy loss, as plain tensor functions (tested against hand-computed values).

Shapes: B sequences, T tokens. `mask` is 1 on tokens the loss trains (generated tokens).
Vocabulary: `engine_logp` = log-probs the rollout engine reported when sampling; `anchor_logp` = the
trainer's log-probs before this step's first update (PPO's "old" policy); `train_logp` = current, with grad;
`ref_logp` = a frozen reference model's (KL penalty).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, std_norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) [/ std of its group]. std_norm=False is Dr. GRPO's unbiased variant."""
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        idx = groups == g
        r = rewards[idx]
        a = r - r.mean()
        if std_norm and r.numel() > 1:
            a = a / (r.std(unbiased=True) + eps)
        adv[idx] = a
    return adv


def keep_informative_groups(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Dynamic sampling (DAPO): a bool mask keeping groups whose rewards are not all equal."""
    keep = torch.zeros_like(rewards, dtype=torch.bool)
    for g in groups.unique():
        idx = groups == g
        keep[idx] = bool(rewards[idx].max() > rewards[idx].min())
    return keep


def mismatch_weights(anchor_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                     cap: float) -> torch.Tensor:
    """Correction for rollout/train mismatch (the engine sampled from a slightly different policy).

    tis:  per-token importance weight exp(anchor - engine), truncated at `cap` (no gradient).
    mask: a sequence whose mean per-token log-ratio leaves [-log cap, log cap] gets weight 0.
    none: all ones.
    """
    log_ratio = (anchor_logp - engine_logp).detach() * mask
    if mode == "none":
        return torch.ones_like(anchor_logp)
    if mode == "tis":
        return torch.exp(log_ratio).clamp(max=cap)
    if mode == "mask":
        seq = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)
        ok = (seq.abs() <= torch.log(torch.tensor(cap))).to(anchor_logp.dtype)
        return ok[:, None].expand_as(anchor_logp)
    raise ValueError(f"unknown mismatch correction {mode!r}")


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str, n_tokens: float, n_seqs: float,
              max_len: int) -> torch.Tensor:
    """Reduce [B, T] losses to a scalar. n_tokens / n_seqs are totals over the whole step's batch, so
    summing this over micro-batches gives exactly the full-batch loss (gradient accumulation)."""
    masked = token_loss * mask
    if mode == "token-mean":
        return masked.sum() / n_tokens
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: a constant length normaliser, no length bias
        return masked.sum() / (max_len * n_seqs)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def k3_kl(train_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - pi) - (ref - pi) - 1 (>= 0, unbiased)."""
    d = ref_logp - train_logp
    return torch.exp(d) - d - 1


def policy_loss(train_logp, anchor_logp, adv, mask, weights, clip_low: float, clip_high: float):
    """Per-token clipped surrogate -min(r A, clip(r, 1-lo, 1+hi) A), r = exp(train - anchor), times
    mismatch weights; and clip flags."""
    ratio = torch.exp(train_logp - anchor_logp)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * a
    loss = -torch.minimum(unclipped, clipped) * weights
    clip_flags = (clipped < unclipped).to(train_logp.dtype) * mask
    return loss, clip_flags


def micro_batch_loss(train_logp, anchor_logp, engine_logp, ref_logp, adv, mask, algo, n_tokens: float,
                     n_seqs: float, max_len: int):
    """One micro-batch's share of the step's loss: clipped surrogate against the anchor, mismatch weights
    (anchor vs engine), optional k3 KL to the reference. Returns (loss, clip flags [B, T], kl [B, T] or None).

    `algo`: the recipe's algorithm section (clip_low/high, mismatch, mismatch_cap, kl_coef, loss_agg).
    """
    weights = mismatch_weights(anchor_logp, engine_logp, mask, algo.mismatch, algo.mismatch_cap)
    tok_loss, clip_flags = policy_loss(train_logp, anchor_logp, adv, mask, weights, algo.clip_low, algo.clip_high)
    kl = None
    if ref_logp is not None:
        kl = k3_kl(train_logp, ref_logp)
        tok_loss = tok_loss + algo.kl_coef * kl
    return aggregate(tok_loss, mask, algo.loss_agg, n_tokens, n_seqs, max_len), clip_flags, kl
