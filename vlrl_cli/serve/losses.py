"""Tinker's built-in losses on one datum's per-position log-probs (the SDK's definitions).

Every loss is a plain sum over positions (not a mean: Tinker documents cross-entropy as
`sum(-logprobs * weights)`), and sums again over datums and over `forward_backward` calls until
`optim_step`. Inputs are aligned with the model input: position i predicts `target_tokens[i]`.

    cross_entropy       target_tokens, weights       sum(-logp * w)
    importance_sampling target_tokens, logprobs (q), advantages
                                                      -sum(exp(logp - q) * A)
    ppo                 same inputs                   -sum(min(r A, clip(r, lo, hi) A)), r = exp(logp - q)
    cispo               same inputs                   -sum(sg(clip(r, lo, hi)) * logp * A)
    stable_reinforce    same inputs + provenance      -sum(sg(min(r, hi)) * logp * A) + kl_coeff * sum((r - 1) - log r)

clip thresholds: loss_fn_config clip_low_threshold / clip_high_threshold (defaults 0.8 / 1.2; Tinker fixes
PPO's at 0.2 around 1). stable_reinforce: Tinker has not published its exact objective; vlrl's is a
truncated importance-weighted REINFORCE (weights capped at clip_high_threshold, default 2.0) with an
optional k3 KL to the sampling policy (`kl_coeff`, default 0), on the sampling log-probs the datum
carries, and it requires every datum to name sequences this server sampled (provenance), as Tinker does.
"""

from __future__ import annotations

import numpy as np
import torch

from .wire import WireError

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "stable_reinforce")
REQUIRED = {"cross_entropy": ("target_tokens", "weights")}
for _name in LOSSES[1:]:
    REQUIRED[_name] = ("target_tokens", "logprobs", "advantages")
KNOWN_CONFIG = {"cross_entropy": set(), "importance_sampling": set(),
                "ppo": {"clip_low_threshold", "clip_high_threshold"},
                "cispo": {"clip_low_threshold", "clip_high_threshold"},
                "stable_reinforce": {"clip_high_threshold", "kl_coeff"}}


def check_request(loss_fn: str, config: dict, inputs: list[dict], length_of) -> None:
    """Raise WireError (a user error) for an unknown loss, a missing or mis-sized input, an unknown option."""
    if loss_fn not in LOSSES:
        raise WireError(f"unknown loss_fn {loss_fn!r}: this server supports {', '.join(LOSSES)}")
    unknown = set(config) - KNOWN_CONFIG[loss_fn]
    if unknown:
        raise WireError(f"loss_fn_config for {loss_fn}: unknown key(s) {sorted(unknown)} "
                        f"(known: {sorted(KNOWN_CONFIG[loss_fn]) or 'none'})")
    for i, d in enumerate(inputs):
        n = length_of(i)
        for key in REQUIRED[loss_fn]:
            if key not in d:
                raise WireError(f"datum {i}: loss {loss_fn} needs loss_fn_inputs[{key!r}]")
            if d[key].shape != (n,):
                raise WireError(f"datum {i}: loss_fn_inputs[{key!r}] has shape {list(d[key].shape)}, "
                                f"the model input has {n} positions")
        # a NaN or inf input makes a NaN loss, and its gradients would wreck every weight: refused here.
        # Sampling log-probs may be -inf where they count for nothing (advantage 0: prompt positions)
        counted = d["advantages"] != 0 if "advantages" in d else None
        for key in REQUIRED[loss_fn][1:]:
            values = d[key] if key != "logprobs" or counted is None else d[key][counted]
            if not np.isfinite(values).all():
                raise WireError(f"datum {i}: loss_fn_inputs[{key!r}] holds NaN or inf")
    for key, value in config.items():
        if isinstance(value, float) and not np.isfinite(value):
            raise WireError(f"loss_fn_config[{key!r}] is {value}")


def datum_loss(loss_fn: str, logp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """The loss (a scalar sum) of one datum; logp: [N] log-probs of target_tokens under the model."""
    if loss_fn == "cross_entropy":
        return -(logp * inputs["weights"]).sum()
    q, adv = inputs["logprobs"], inputs["advantages"]
    mask = adv != 0  # prompt positions carry advantage 0; their q may be a placeholder 0
    log_ratio = torch.where(mask, logp - q, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    if loss_fn == "importance_sampling":
        return -(ratio * adv).sum()
    lo, hi = float(config.get("clip_low_threshold", 0.8)), float(config.get("clip_high_threshold", 1.2))
    if loss_fn == "ppo":
        return -torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv).sum()
    if loss_fn == "cispo":
        return -(ratio.clamp(lo, hi).detach() * logp * adv).sum()
    # stable_reinforce
    cap = float(config.get("clip_high_threshold", 2.0))
    loss = -(ratio.clamp(max=cap).detach() * logp * adv).sum()
    kl = float(config.get("kl_coeff", 0.0))
    if kl:
        loss = loss + kl * torch.where(mask, (ratio - 1) - log_ratio, torch.zeros_like(logp)).sum()
    return loss
