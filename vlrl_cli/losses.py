"""GRPO-family advantages and policy loss, as plain tensor functions (tested against hand-computed values).

Shapes: B sequences, T tokens. `mask` is 1 on tokens the loss trains (generated tokens).
Vocabulary: `engine_logp` = log-probs the rollout engine reported when sampling; `old_logp` = the
trainer's log-probs before this step's update (the PPO anchor); `train_logp` = current, with grad.
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


def mismatch_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                     cap: float) -> torch.Tensor:
    """Correction for rollout/train mismatch (the engine sampled from a slightly different policy).

    tis:  per-token importance weight exp(old - engine), truncated at `cap` (no gradient).
    mask: a sequence whose mean per-token log-ratio leaves [-log cap, log cap] gets weight 0.
    none: all ones.
    """
    log_ratio = (old_logp - engine_logp).detach() * mask
    if mode == "none":
        return torch.ones_like(old_logp)
    if mode == "tis":
        return torch.exp(log_ratio).clamp(max=cap)
    if mode == "mask":
        seq = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)
        ok = (seq.abs() <= torch.log(torch.tensor(cap))).to(old_logp.dtype)
        return ok[:, None].expand_as(old_logp)
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


def policy_loss(train_logp, old_logp, adv, mask, weights, clip_low: float, clip_high: float):
    """Per-token clipped surrogate -min(r A, clip(r, 1-lo, 1+hi) A), times mismatch weights; and clip flags."""
    ratio = torch.exp(train_logp - old_logp)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * a
    loss = -torch.minimum(unclipped, clipped) * weights
    clip_flags = (clipped < unclipped).to(train_logp.dtype) * mask
    return loss, clip_flags
